"""Shared test helpers."""

import os

import keras
import numpy as np
import tensorflow as tf


def assert_layer_round_trip(layer, inputs, tmp_path, atol=1e-6):
    """Round-trips `layer` through get_config/from_config, a .keras file and a SavedModel.

    Each copy must give the layer's output on `inputs` (same weights) within `atol`.
    Returns the layer's output as numpy.
    """
    inputs = np.asarray(inputs, np.float32)
    expected = keras.ops.convert_to_numpy(layer(inputs))

    clone = layer.__class__.from_config(layer.get_config())
    clone(inputs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(inputs)), expected, atol=atol)
    assert clone.get_config() == layer.get_config()

    x = keras.Input(shape=inputs.shape[1:], dtype="float32")
    model = keras.Model(x, layer(x))
    path = os.path.join(tmp_path, "layer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(inputs)), expected, atol=atol)

    export_dir = os.path.join(tmp_path, "saved_model")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    np.testing.assert_allclose(served.serve(tf.constant(inputs)).numpy(), expected, atol=atol)
    return expected


def tiny_backbone(channels=8, seed=0):
    """A two-conv feature extractor [B, H, W, 3] -> [B, H/4, W/4, channels] with seeded weights."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((None, None, 3))
    y = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(y)
    return keras.Model(x, y, name="tiny_backbone")
