import numpy as np
import pytest
import tensorflow as tf

from tests.kit import assert_layer_round_trip
from tfmet.layers import GeMPooling2D, L2Normalize, Projector, gem, l2_normalize


def test_gem_hand_checked_values():
    # Channel 0: (1, 2, 3, 4) -> ((1 + 8 + 27 + 64) / 4)^(1/3) = 25^(1/3).
    # Channel 1: (0, -1, 2, 2) -> the clamp turns 0 and -1 into 1e-6, whose cubes vanish:
    #            ((8 + 8) / 4)^(1/3) = 4^(1/3).
    x = np.array([[[[1.0, 0.0], [2.0, -1.0]], [[3.0, 2.0], [4.0, 2.0]]]], np.float32)
    out = gem(x, p=3.0).numpy()
    np.testing.assert_allclose(out, [[2.9240177, 1.5874011]], rtol=1e-6)


def test_gem_p1_is_average_pooling_and_large_p_approaches_max():
    x = np.random.default_rng(0).uniform(0.1, 2.0, (2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(gem(x, p=1.0).numpy(), x.mean(axis=(1, 2)), rtol=1e-6)
    big_p = gem(tf.constant(x, tf.float64), p=200.0).numpy()
    np.testing.assert_allclose(big_p, x.max(axis=(1, 2)), rtol=2e-2)
    assert np.all(big_p <= x.max(axis=(1, 2)) + 1e-6)


def test_gem_layer_round_trip_and_value(tmp_path):
    x = np.random.default_rng(1).uniform(0, 1, (2, 4, 3, 5)).astype(np.float32)
    layer = GeMPooling2D(p=2.5)
    out = assert_layer_round_trip(layer, x, tmp_path)
    expected = np.mean(np.maximum(x, 1e-6) ** 2.5, axis=(1, 2)) ** (1 / 2.5)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert layer.trainable_weights and float(layer.power.numpy()) == 2.5


def test_gem_freeze_p_and_bad_arguments():
    layer = GeMPooling2D(train_p=False)
    layer.build((None, 2, 2, 3))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    with pytest.raises(ValueError, match="Received: p=0"):
        GeMPooling2D(p=0)
    with pytest.raises(ValueError, match="4-D NHWC"):
        GeMPooling2D().build((None, 3))


def test_l2_normalize_round_trip_and_zero_rows(tmp_path):
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    out = assert_layer_round_trip(L2Normalize(), x, tmp_path)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(l2_normalize(x).numpy(), out)


def test_projector_from_pca_computes_centered_projection(tmp_path):
    rng = np.random.default_rng(2)
    mean = rng.normal(size=4)
    projection = rng.normal(size=(4, 3))
    x = rng.normal(size=(5, 4)).astype(np.float32)
    layer = Projector.from_pca(mean, projection)
    out = assert_layer_round_trip(layer, x, tmp_path, atol=1e-5)
    np.testing.assert_allclose(out, (x - mean) @ projection, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"projection.*\[d, 3\]"):
        layer.set_pca(mean, projection[:, :2])
