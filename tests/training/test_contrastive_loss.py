"""Contrastive loss: hand-derived values, a numpy re-implementation, the Keras Loss wrapper."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmet.training.contrastive.loss import (
    ContrastiveLoss,
    contrastive_loss,
    pair_squared_distances,
)


def numpy_contrastive(e1, e2, y, margin=1.8, eps=1e-9):
    d2 = np.sum((np.asarray(e2, np.float64) - np.asarray(e1, np.float64)) ** 2, axis=1)
    y = np.asarray(y, np.float64)
    hinge = np.maximum(margin - np.sqrt(d2 + eps), 0.0)
    return 0.5 * (y * d2 + (1 - y) * hinge**2)


def test_hand_computed_values():
    # Orthogonal unit vectors: d^2 = 2.
    e1 = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]]
    e2 = [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]]
    y = [1, 0, 0, 0, 1]
    got = contrastive_loss(e1, e2, y).numpy()
    expected = [
        0.5 * 2.0,  # positive: d^2 / 2
        0.5 * (1.8 - np.sqrt(2.0 + 1e-9)) ** 2,  # negative inside the margin
        0.5 * (1.8 - np.sqrt(1e-9)) ** 2,  # identical negative: full margin (eps under sqrt)
        0.0,  # negative at distance 2 > margin
        0.0,  # identical positive
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got[1] == pytest.approx(0.0744156, abs=1e-6)  # (1.8 - 1.4142136)^2 / 2


def test_matches_numpy_on_random_pairs():
    rng = np.random.default_rng(0)
    e1 = rng.normal(size=(64, 16))
    e2 = rng.normal(size=(64, 16))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    e2[:8] = e1[:8] + 0.01 * rng.normal(size=(8, 16))  # some close pairs
    y = rng.integers(0, 2, 64)
    for margin in (0.5, 1.8):
        got = contrastive_loss(e1.astype(np.float32), e2.astype(np.float32), y, margin).numpy()
        np.testing.assert_allclose(got, numpy_contrastive(e1, e2, y, margin), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        pair_squared_distances(e1, e2).numpy(), np.sum((e1 - e2) ** 2, axis=1), rtol=1e-5
    )


def test_keras_loss_averages_over_pairs_and_round_trips():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(10, 2, 8)).astype(np.float32)
    y = rng.integers(0, 2, 10)
    loss = ContrastiveLoss(margin=1.2)
    expected = numpy_contrastive(e[:, 0], e[:, 1], y, margin=1.2).mean()
    assert float(loss(y, e)) == pytest.approx(expected, rel=1e-5)
    summed = ContrastiveLoss(margin=1.2, reduction="sum")
    assert float(summed(y, e)) == pytest.approx(expected * 10, rel=1e-5)

    config = loss.get_config()
    assert config["margin"] == 1.2 and config["eps"] == 1e-9
    clone = ContrastiveLoss.from_config(config)
    assert float(clone(y, e)) == pytest.approx(expected, rel=1e-5)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, ContrastiveLoss) and restored.margin == 1.2


def test_gradient_is_finite_for_identical_negatives():
    e = tf.constant([[0.6, 0.8]])
    with tf.GradientTape() as tape:
        tape.watch(e)
        value = contrastive_loss(e, e, [0])
    grad = tape.gradient(value, e)
    assert np.all(np.isfinite(grad.numpy()))
    # A positive pair's gradient w.r.t. the first embedding is (e1 - e2), here for d^2/2.
    e1, e2 = tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 1.0]])
    with tf.GradientTape() as tape:
        tape.watch(e1)
        value = contrastive_loss(e1, e2, [1])
    np.testing.assert_allclose(tape.gradient(value, e1).numpy(), [[1.0, -1.0]], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=0.0)
    with pytest.raises(ValueError, match="eps"):
        ContrastiveLoss(eps=-1.0)
