"""`run_layer_test` and `run_serialization_test`: the checks every tfmet Keras class gets.

In the spirit of keras-hub's `TestCase.run_layer_test`: one call builds the object from its
constructor arguments and checks its config round trip, its `.keras` and SavedModel round trips,
`compute_output_shape` against the real output, and one value the test worked out by hand.
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras.src.saving.serialization_lib import SafeModeScope  # no public context manager


def _numpy(tree):
    """A tensor, array, nested list or number -> array; a dict of those -> dict of arrays."""
    if isinstance(tree, dict):
        return {key: _numpy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return np.asarray([_numpy(value) for value in tree])
    return np.asarray(keras.ops.convert_to_numpy(tree))


def _assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = _numpy(actual), _numpy(expected)
    tf.nest.assert_same_structure(actual, expected)
    for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def assert_layer_round_trip(layer, inputs, tmp_path, atol=1e-6, safe_mode=True):
    """Round-trips `layer` through get_config/from_config, a .keras file and a SavedModel.

    Each copy must give the layer's output on `inputs` (same weights) within `atol`; outputs may
    be a tensor or a dict of tensors. `safe_mode=False` lets a layer that loads code (a hub
    module) be deserialised. Returns the layer's output as numpy.
    """
    inputs = np.asarray(inputs, np.float32)
    expected = _numpy(layer(inputs))

    with SafeModeScope(safe_mode):
        clone = layer.__class__.from_config(layer.get_config())
    clone(inputs)
    clone.set_weights(layer.get_weights())
    _assert_close(clone(inputs), expected, atol, what="from_config(get_config())")
    assert clone.get_config() == layer.get_config()

    x = keras.Input(shape=inputs.shape[1:], dtype="float32")
    model = keras.Model(x, layer(x))
    path = os.path.join(tmp_path, "layer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=safe_mode)
    _assert_close(loaded(inputs), expected, atol, what=".keras file")

    export_dir = os.path.join(tmp_path, "saved_model")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    _assert_close(served.serve(tf.constant(inputs)), expected, atol, what="SavedModel")
    return expected


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    expected_output=None,
    *,
    weights=None,
    expected_output_shape=None,
    has_compute_output_shape=True,
    safe_mode=True,
    atol=1e-6,
    rtol=1e-6,
    tmp_path=None,
):
    """Checks a Keras layer (or subclassed model) class end to end; returns its output as numpy.

    Args:
      layer_cls: the class under test.
      init_kwargs: constructor arguments (objects such as a backbone model are fine).
      input_data: one float32 batch, [B, ...].
      expected_output: the value worked out by hand for `input_data` (array or dict of arrays).
      weights: if given, `set_weights(weights)` after the first call (to make values checkable).
      expected_output_shape: the output shape(s) for `input_data`; by default the real output's.
      has_compute_output_shape: False for a class that does not implement compute_output_shape
        (then only the symbolic `compute_output_spec` is checked, and the class must indeed
        lack it, so that the flag goes away when the method is added).
      safe_mode: False for a layer that keras only deserialises outside safe mode (hub modules).
      atol, rtol: tolerances of the hand-checked value (round trips use `atol` alone).
      tmp_path: directory for the .keras file and the SavedModel (a temporary one if None).

    Checks: get_config -> from_config gives an equal config and the same output with the same
    weights; a functional model around the layer survives `.keras` save/load and
    `export` + `tf.saved_model.load`; `compute_output_shape(input shape)` and the symbolic
    `compute_output_spec` agree with the real output shape (and `expected_output_shape`); the
    output equals `expected_output`.
    """
    input_data = np.asarray(input_data, np.float32)
    layer = layer_cls(**init_kwargs)
    output = layer(input_data)
    if weights is not None:
        layer.set_weights(weights)
        output = layer(input_data)
    actual_shape = tf.nest.map_structure(lambda t: tuple(t.shape), output)
    if expected_output_shape is not None:
        assert actual_shape == expected_output_shape, (actual_shape, expected_output_shape)
    _check_output_shapes(layer, input_data.shape, actual_shape, has_compute_output_shape)
    if expected_output is not None:
        _assert_close(output, expected_output, atol, rtol, what="hand-checked value")
    if tmp_path is None:
        with tempfile.TemporaryDirectory() as directory:
            return assert_layer_round_trip(layer, input_data, directory, atol, safe_mode)
    return assert_layer_round_trip(layer, input_data, tmp_path, atol, safe_mode)


def _check_output_shapes(layer, input_shape, actual_shape, has_compute_output_shape):
    overridden = type(layer).compute_output_shape is not keras.layers.Layer.compute_output_shape
    overridden = (
        overridden and type(layer).compute_output_shape is not keras.Model.compute_output_shape
    )
    assert overridden == has_compute_output_shape, (
        f"{type(layer).__name__} implements compute_output_shape: {overridden}; "
        f"has_compute_output_shape={has_compute_output_shape}"
    )
    if has_compute_output_shape:
        computed = _as_shapes(layer.compute_output_shape(input_shape))
        assert _shapes_match(computed, actual_shape), (computed, actual_shape)
    symbolic = keras.KerasTensor((None, *input_shape[1:]), dtype="float32")
    spec = _as_shapes(tf.nest.map_structure(lambda t: t.shape, layer.compute_output_spec(symbolic)))
    assert _shapes_match(spec, actual_shape), (spec, actual_shape)


def _as_shapes(shapes):
    if isinstance(shapes, dict):
        return {key: tuple(shape) for key, shape in shapes.items()}
    return tuple(shapes)


def _shapes_match(computed, actual):
    """Shapes agree dimension by dimension; None in `computed` matches any size."""
    if isinstance(actual, dict):
        return set(computed) == set(actual) and all(
            _shapes_match(computed[k], actual[k]) for k in actual
        )
    return len(computed) == len(actual) and all(
        c is None or c == a for c, a in zip(computed, actual, strict=True)
    )


def run_serialization_test(obj_cls, init_kwargs, compute, expected, *, atol=1e-6, tmp_path=None):
    """Checks a Keras metric, loss or optimizer class; returns `compute(obj)` as numpy.

    `compute(obj)` runs the object on fixed inputs (update_state + result, a loss call, optimizer
    steps on a variable) and must give `expected`, worked out by hand, for the object, for its
    from_config(get_config()) copy and for the copy that `keras.saving` deserialises by its
    registered name. A model compiled with the object must also come back from a `.keras` file
    with an object of the same class and config.
    """
    obj = obj_cls(**init_kwargs)
    value = _numpy(compute(obj))
    _assert_close(value, expected, atol, what="hand-checked value")
    config = obj.get_config()
    clone = obj_cls.from_config(config)
    assert clone.get_config() == config
    _assert_close(compute(clone), expected, atol, what="from_config(get_config())")
    serialized = keras.saving.serialize_keras_object(obj_cls(**init_kwargs))
    assert serialized["registered_name"] == f"tfmet>{obj_cls.__name__}", serialized
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is obj_cls and _without_name(revived.get_config()) == _without_name(config)
    _assert_close(compute(revived), expected, atol, what="deserialize_keras_object")
    if tmp_path is None:
        with tempfile.TemporaryDirectory() as directory:
            _assert_compiled_round_trip(obj_cls, init_kwargs, config, directory)
    else:
        _assert_compiled_round_trip(obj_cls, init_kwargs, config, tmp_path)
    return value


def _assert_compiled_round_trip(obj_cls, init_kwargs, config, directory):
    """A model compiled with a fresh object keeps it (class and config) through a .keras file."""
    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Dense(2)(x))
    compile_kwargs = {"optimizer": "sgd", "loss": "mse"}
    if issubclass(obj_cls, keras.optimizers.Optimizer):
        compile_kwargs["optimizer"] = obj_cls(**init_kwargs)
    elif issubclass(obj_cls, keras.losses.Loss):
        compile_kwargs["loss"] = obj_cls(**init_kwargs)
    else:
        compile_kwargs["metrics"] = [obj_cls(**init_kwargs)]
    model.compile(**compile_kwargs)
    model.optimizer.build(model.trainable_variables)  # saved with its slots
    path = os.path.join(directory, "compiled.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    compiled = keras.saving.deserialize_keras_object(
        loaded.get_compile_config(), custom_objects=None
    )
    if "metrics" in compile_kwargs:
        revived = compiled["metrics"][0]
    elif isinstance(compile_kwargs["loss"], keras.losses.Loss):
        revived = compiled["loss"]
    else:
        revived = loaded.optimizer
    assert type(revived) is obj_cls, type(revived)
    assert _without_name(revived.get_config()) == _without_name(config)


def _without_name(config):
    """A config without its auto-numbered "name" (a second instance is named foo_1)."""
    return {key: value for key, value in config.items() if key != "name"}
