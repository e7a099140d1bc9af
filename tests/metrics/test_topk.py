"""Top-k accuracy and flip bagging against numpy on hand-made logits."""

import numpy as np
import pytest
import tensorflow as tf

from tfmet.metrics.topk import (
    TopKAccuracy,
    bag_probabilities,
    flip_bagged_probabilities,
    top_k_accuracy,
    top_k_correct,
)

# Five rows over four classes; row 3 ties classes 1 and 2, row 4 has no label.
LOGITS = np.array(
    [
        [2.0, 1.0, 0.0, -1.0],  # label 0: rank 0
        [0.5, 3.0, 2.0, 1.0],  # label 3: rank 2
        [0.0, 0.0, 0.0, 5.0],  # label 2: rank 1 (only class 3 is strictly higher)
        [1.0, 4.0, 4.0, 0.0],  # label 1: rank 0 (class 2 ties, not strictly higher)
        [9.0, 0.0, 0.0, 0.0],  # label -1: missing
    ],
    np.float32,
)
LABELS = np.array([0, 3, 2, 1, -1])


def numpy_top_k(logits, labels, k):
    correct = []
    for row, label in zip(logits, labels, strict=True):
        correct.append(label >= 0 and int(np.sum(row > row[label])) < k)
    return np.array(correct)


def numpy_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, [True, False, False, True, False]),
        (2, [True, False, True, True, False]),
        (3, [True, True, True, True, False]),
        (7, [True, True, True, True, False]),
    ],
)
def test_top_k_correct_hand_values(k, expected):
    np.testing.assert_array_equal(top_k_correct(LOGITS, LABELS, k).numpy(), expected)
    np.testing.assert_array_equal(numpy_top_k(LOGITS, LABELS, k), expected)


def test_top_k_accuracy_ignores_missing_labels():
    # Four labelled rows: top-1 2/4, top-2 3/4, top-3 4/4.
    assert top_k_accuracy(LOGITS, LABELS, 1) == pytest.approx(0.5)
    assert top_k_accuracy(LOGITS, LABELS, 2) == pytest.approx(0.75)
    assert top_k_accuracy(LOGITS, LABELS, 3) == pytest.approx(1.0)
    assert top_k_accuracy(LOGITS, np.full(5, -1), 1) == 0.0


def test_top_k_random_logits_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    logits[:20, 3] = logits[:20, 5]  # some ties
    labels = rng.integers(-1, 7, size=200)
    for k in (1, 3, 5):
        np.testing.assert_array_equal(
            top_k_correct(logits, labels, k).numpy(), numpy_top_k(logits, labels, k)
        )


def test_streaming_metric_accumulates_batches_and_runs_in_graph():
    metric = TopKAccuracy(2)
    metric.update_state(LABELS[:2], LOGITS[:2])
    metric.update_state(LABELS[2:], LOGITS[2:])
    assert float(metric.result()) == pytest.approx(0.75)
    assert metric.name == "top2"

    graph_metric = TopKAccuracy(1)

    @tf.function
    def update(labels, logits):
        graph_metric.update_state(labels, logits)

    update(tf.constant(LABELS), tf.constant(LOGITS))
    assert float(graph_metric.result()) == pytest.approx(0.5)
    graph_metric.reset_state()
    assert float(graph_metric.result()) == 0.0  # empty state guarded
    assert TopKAccuracy.from_config(graph_metric.get_config()).k == 1


def test_sample_weights():
    metric = TopKAccuracy(1)
    metric.update_state(LABELS, LOGITS, sample_weight=[1.0, 3.0, 1.0, 1.0, 1.0])
    # correct rows 0 and 3 (weight 2) over labelled weight 1 + 3 + 1 + 1 = 6
    assert float(metric.result()) == pytest.approx(2.0 / 6.0)


def test_invalid_k():
    with pytest.raises(ValueError, match="Received: k=0"):
        TopKAccuracy(0)
    with pytest.raises(ValueError, match="positive"):
        top_k_correct(LOGITS, LABELS, 0)


def test_bag_probabilities_is_mean_of_softmaxes():
    a = np.array([[1.0, 2.0, 3.0]], np.float32)
    b = np.array([[3.0, 2.0, 1.0]], np.float32)
    # By symmetry the mean of the two softmaxes is (s0 + s2)/2, s1, (s0 + s2)/2.
    s = numpy_softmax(a)[0]
    expected = [[(s[0] + s[2]) / 2, s[1], (s[0] + s[2]) / 2]]
    np.testing.assert_allclose(bag_probabilities(a, b).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(bag_probabilities(a).numpy(), numpy_softmax(a), rtol=1e-6)
    with pytest.raises(ValueError):
        bag_probabilities()


def test_flip_bagging_against_numpy():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, size=(3, 4, 6, 3)).astype(np.float32)
    weights = rng.normal(size=(4 * 6 * 3, 5)).astype(np.float32)

    def logits_fn(x):  # not mirror-symmetric, so the flip matters
        return tf.reshape(x, [tf.shape(x)[0], -1]) @ weights / 255.0

    expected = (
        numpy_softmax(images.reshape(3, -1) @ weights / 255.0)
        + numpy_softmax(images[:, :, ::-1].reshape(3, -1) @ weights / 255.0)
    ) / 2
    np.testing.assert_allclose(
        flip_bagged_probabilities(logits_fn, images).numpy(), expected, rtol=1e-5, atol=1e-7
    )
    as_dict = flip_bagged_probabilities(lambda x: {"style": logits_fn(x)}, images)
    np.testing.assert_allclose(as_dict["style"].numpy(), expected, rtol=1e-5, atol=1e-7)
    plain = numpy_softmax(images.reshape(3, -1) @ weights / 255.0)
    assert not np.allclose(expected, plain, atol=1e-3)
