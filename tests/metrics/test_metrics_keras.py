"""Streaming GlobalAveragePrecision / MetAccuracy equal the numpy functions on all batches seen."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmet import metrics
from tfmet.metrics import keras_metrics


def _queries(seed, n=50, classes=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[rng.random(n) < 0.3] = -1
    pred = np.where(rng.random(n) < 0.6, np.maximum(labels, 0), rng.integers(0, classes, n))
    conf = np.round(rng.random(n), 2)  # some ties, ranked across batch boundaries
    return pred, conf, labels


@pytest.mark.parametrize("exclude", [False, True])
def test_streaming_equals_function_on_concatenated_batches(exclude):
    pred, conf, labels = _queries(0)
    metric = keras_metrics.GlobalAveragePrecision(exclude_distractors=exclude, capacity=64)
    accuracy = keras_metrics.MetAccuracy()
    for start, stop in ((0, 7), (7, 30), (30, 31), (31, 50)):
        batch = (pred[start:stop], conf[start:stop])
        metric.update_state(labels[start:stop], batch)
        accuracy.update_state(labels[start:stop], {"pred": batch[0], "conf": batch[1]})
    expected = (metrics.gap_minus if exclude else metrics.gap)(pred, conf, labels)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    assert metric.name == ("gap_minus" if exclude else "gap")
    assert float(accuracy.result()) == pytest.approx(metrics.accuracy(pred, labels), rel=1e-6)

    metric.reset_state()
    accuracy.reset_state()
    assert float(metric.result()) == 0.0 and float(accuracy.result()) == 0.0
    metric.update_state(labels[:10], (pred[:10], conf[:10]))
    assert float(metric.result()) == pytest.approx(
        (metrics.gap_minus if exclude else metrics.gap)(pred[:10], conf[:10], labels[:10]),
        rel=1e-6,
    )


def test_in_a_compiled_custom_loop():
    pred, conf, labels = _queries(1)
    metric = keras_metrics.GlobalAveragePrecision(capacity=50)

    @tf.function
    def step(y, p, c):
        metric.update_state(y, (p, c))

    for start in range(0, 50, 16):
        step(labels[start : start + 16], pred[start : start + 16], conf[start : start + 16])
    assert float(metric.result()) == pytest.approx(metrics.gap(pred, conf, labels), rel=1e-6)


def test_capacity_overflow_is_an_error():
    metric = keras_metrics.GlobalAveragePrecision(capacity=4)
    metric.update_state([1, 2, 3], ([1, 2, 3], [0.1, 0.2, 0.3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="capacity=4"):
        metric.update_state([1, 2], ([1, 2], [0.1, 0.2]))


def test_config_round_trip():
    metric = keras_metrics.GlobalAveragePrecision(exclude_distractors=True, capacity=100, name="g")
    clone = keras_metrics.GlobalAveragePrecision.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()
    assert (clone.exclude_distractors, clone.capacity, clone.name) == (True, 100, "g")
    serialized = keras.metrics.serialize(keras_metrics.MetAccuracy(name="a"))
    restored = keras.metrics.deserialize(serialized)
    assert isinstance(restored, keras_metrics.MetAccuracy) and restored.name == "a"


def test_model_compile_evaluate_and_save(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype("float32")
    labels = rng.integers(0, 4, 40)
    labels[::5] = -1
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1),
        metrics=[keras_metrics.GlobalAveragePrecision(), keras_metrics.MetAccuracy()],
    )
    scores = model.predict(x, verbose=0)
    pred, conf = scores.argmax(1), scores.max(1)
    results = model.evaluate(x, labels, batch_size=8, return_dict=True, verbose=0)
    assert results["gap"] == pytest.approx(metrics.gap(pred, conf, labels), rel=1e-5)
    assert results["met_accuracy"] == pytest.approx(metrics.accuracy(pred, labels), rel=1e-5)

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.evaluate(x, labels, batch_size=16, return_dict=True, verbose=0)
    assert again["gap"] == pytest.approx(results["gap"], rel=1e-6)
    assert again["met_accuracy"] == pytest.approx(results["met_accuracy"], rel=1e-6)


def test_bad_input():
    metric = keras_metrics.GlobalAveragePrecision()
    with pytest.raises(ValueError, match="sample_weight"):
        metric.update_state([1], ([1], [0.5]), sample_weight=[1.0])
    with pytest.raises(ValueError, match="class scores"):
        metric.update_state([1], tf.zeros([1, 2, 3]))
    with pytest.raises(ValueError, match="capacity"):
        keras_metrics.GlobalAveragePrecision(capacity=0)
