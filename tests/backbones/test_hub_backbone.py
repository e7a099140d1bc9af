"""TF-Hub backbones: hub-format SavedModels built here, loaded through "hub:<path>"."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.kit.hub_modules import B2, HEAD
from tests.kit.hub_modules import DictModule as _DictModule
from tests.kit.hub_modules import TensorModule as _TensorModule
from tests.kit.hub_modules import expected_feature_map as _expected_feature_map
from tests.kit.hub_modules import save_module as _save
from tfmet import backbones
from tfmet.backbones import hub, hub_module


@pytest.fixture(scope="module")
def tensor_module(tmp_path_factory):
    return _save(_TensorModule(), str(tmp_path_factory.mktemp("hub") / "tensor_module"))


@pytest.fixture(scope="module")
def dict_module(tmp_path_factory):
    return _save(_DictModule(), str(tmp_path_factory.mktemp("hub") / "dict_module"), True)


def _images(shape=(2, 9, 7, 3), seed=1):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def test_tensor_module_output_matches_direct_computation(tensor_module):
    model = backbones.get("hub:" + tensor_module)
    images = _images()
    out = keras.ops.convert_to_numpy(model(images))
    assert out.shape == (2, 5, 4, 6)
    np.testing.assert_allclose(out, _expected_feature_map(images), rtol=1e-5, atol=1e-5)
    # Another spatial size through the same model (None dims).
    images = _images((1, 16, 11, 3), seed=2)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)), _expected_feature_map(images), atol=1e-5
    )
    assert backbones.preprocessing("hub:" + tensor_module) == backbones.SCALE_ZERO_ONE


def test_dict_module_feature_map_output_by_name_option(dict_module):
    model = backbones.get(f"hub:{dict_module}#output=feature_map&preprocessing=minus_one_one")
    images = _images()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)), _expected_feature_map(images), atol=1e-5
    )
    spec = backbones.spec(f"hub:{dict_module}#output=feature_map&preprocessing=minus_one_one")
    assert spec.preprocessing == backbones.SCALE_MINUS_ONE_ONE
    pooled = backbones.get("hub:" + dict_module, output_key="default")(images)
    expected = _expected_feature_map(images).mean(axis=(1, 2)) @ HEAD
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pooled), expected, rtol=1e-4, atol=1e-5)


def test_dict_module_without_or_with_unknown_output_lists_outputs(dict_module):
    with pytest.raises(ValueError, match=r"Available outputs: \['default', 'feature_map'\]"):
        backbones.get("hub:" + dict_module)
    with pytest.raises(ValueError, match=r"no output 'logits'.*\['default', 'feature_map'\]"):
        backbones.get("hub:" + dict_module, output_key="logits")


def test_tensor_module_rejects_output_key(tensor_module):
    with pytest.raises(ValueError, match="single tensor"):
        backbones.get("hub:" + tensor_module, output_key="feature_map")


@pytest.mark.parametrize("module_fixture", ["tensor_module", "dict_module"])
def test_pattern_selected_variables_train_and_others_stay(module_fixture, request):
    path = request.getfixturevalue(module_fixture)
    name = f"hub:{path}#trainable=^block2/"
    if module_fixture == "dict_module":
        name += "&output=feature_map"
    model = backbones.get(name)
    layer = hub.hub_layer(model)
    names = sorted(layer.variable_name(v) for v in model.trainable_weights)
    assert names == ["block2/conv/bias:0", "block2/conv/kernel:0"]
    frozen = sorted(layer.variable_name(v) for v in model.non_trainable_weights)
    assert frozen == [
        "block1/conv/kernel:0",
        "block2/bn/moving_mean:0",
        "head/kernel:0",
        "l2_weight:0",
    ]

    before = {layer.variable_name(v): keras.ops.convert_to_numpy(v) for v in model.weights}
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    images = _images()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(images, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None for g in grads)
    optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    changed = sorted(
        name
        for name, value in before.items()
        if not np.array_equal(value, keras.ops.convert_to_numpy(_by_name(model, layer, name)))
    )
    assert changed == ["block2/conv/bias:0", "block2/conv/kernel:0"]
    # d(sum)/d(bias) is the number of output positions per channel: 2 * 5 * 4.
    bias = keras.ops.convert_to_numpy(_by_name(model, layer, "block2/conv/bias:0"))
    np.testing.assert_allclose(bias, B2 - 0.1 * 40.0, rtol=1e-5)
    # The module itself computes with the updated variables.
    k2 = keras.ops.convert_to_numpy(_by_name(model, layer, "block2/conv/kernel:0"))
    out = keras.ops.convert_to_numpy(model(images))
    np.testing.assert_allclose(out, _expected_feature_map(images, k2, bias), atol=1e-4)


def _by_name(model, layer, name):
    return next(v for v in model.weights if layer.variable_name(v) == name)


def test_trainable_toggle_keeps_pattern_selection(tensor_module):
    model = backbones.get("hub:" + tensor_module, trainable_patterns=["kernel"])
    layer = hub.hub_layer(model)
    expected = ["block1/conv/kernel:0", "block2/conv/kernel:0", "head/kernel:0"]
    assert sorted(layer.variable_name(v) for v in model.trainable_weights) == expected
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    assert sorted(layer.variable_name(v) for v in model.trainable_weights) == expected
    # Default: everything the module marks trainable; [] freezes all.
    assert len(backbones.get("hub:" + tensor_module).trainable_weights) == 4
    assert hub.hub_layer(model).set_trainable_patterns([]) == []
    assert model.trainable_weights == []


def test_regularization_losses_are_added_when_training(dict_module):
    model = backbones.get(f"hub:{dict_module}#output=feature_map&trainable=head")
    model(_images(), training=True)
    assert len(model.losses) == 1
    np.testing.assert_allclose(float(model.losses[0]), 0.5 * np.sum(HEAD**2), rtol=1e-5)


def test_weights_round_trip_through_weights_file(tensor_module, tmp_path):
    model = backbones.get("hub:" + tensor_module)
    for v in model.trainable_weights:
        v.assign(v + 1.0)
    path = str(tmp_path / "hub.weights.h5")
    model.save_weights(path)
    images = _images()
    fresh = backbones.get("hub:" + tensor_module)
    assert not np.allclose(fresh(images), model(images))
    reloaded = backbones.get("hub:" + tensor_module, weights=path)
    np.testing.assert_allclose(reloaded(images), model(images), atol=1e-6)


def test_bad_handles_and_options(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        backbones.get("hub:" + missing)
    with pytest.raises(ValueError, match="Bad hub option 'colour=red'"):
        backbones.spec("hub:/x#colour=red")
    with pytest.raises(ValueError, match="Unknown hub preprocessing 'bgr'"):
        backbones.spec("hub:/x#preprocessing=bgr")


def test_register_module_gives_a_plain_name(tensor_module):
    hub.register_module("test_hub_trunk", tensor_module, preprocessing="minus_one_one")
    assert backbones.preprocessing("test_hub_trunk") == backbones.SCALE_MINUS_ONE_ONE
    images = _images()
    np.testing.assert_allclose(
        backbones.get("test_hub_trunk")(images), _expected_feature_map(images), atol=1e-5
    )


def test_offline_url_handle_is_read_from_tfhub_cache(tensor_module, tmp_path, monkeypatch):
    """A URL handle resolves to TFHUB_CACHE_DIR/<sha1 of the handle> without the network."""
    import hashlib
    import shutil

    handle = "https://tfhub.dev/tfmet/test-trunk/1"
    cache = tmp_path / "cache"
    target = cache / hashlib.sha1(handle.encode("utf8")).hexdigest()
    shutil.copytree(tensor_module, target)
    (cache / (target.name + ".descriptor.txt")).write_text("test\n")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    assert os.path.samefile(hub_module.resolve(handle), target)
    images = _images()
    np.testing.assert_allclose(
        backbones.get("hub:" + handle)(images), _expected_feature_map(images), atol=1e-5
    )
