"""tfmet.training.style: StyleClassifier / StyleHead round trip, pooling, masked cross-entropy."""

import keras
import numpy as np
import pytest

from tfmet.training.style.model import (
    MaskedSparseCrossEntropy,
    StyleClassifier,
    StyleHead,
    masked_cross_entropy,
)


def test_classifier_round_trip_gem_and_two_heads(tmp_path):
    keras.utils.set_random_seed(1)
    class_names = {"style": ["a", "b", "c"], "artist": ["x", "y"]}
    classifier = StyleClassifier.from_registry(
        "resnet_tiny", class_names, pooling="gem", dropout=0.3, name="style_classifier"
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = {a: v.numpy() for a, v in classifier(images).items()}
    assert expected["style"].shape == (2, 3) and expected["artist"].shape == (2, 2)
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.class_names == class_names and loaded.pooling == "gem"
    for a, v in loaded(images).items():
        np.testing.assert_allclose(v.numpy(), expected[a], rtol=1e-5, atol=1e-5)


def test_pooled_backbone_output_skips_pooling():
    x = keras.Input((None, None, 3))
    backbone = keras.Model(x, keras.layers.GlobalAveragePooling2D()(x))
    head = StyleHead({"style": ["a", "b"]})
    classifier = StyleClassifier(backbone, head)
    images = np.full((1, 4, 4, 3), 2.0, np.float32)
    np.testing.assert_allclose(classifier.features(images).numpy(), [[2.0, 2.0, 2.0]])


def test_masked_cross_entropy_against_numpy():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)
    labels = np.array([0, -1, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(log_softmax[0, 0] + log_softmax[2, 1]) / 2
    assert masked_cross_entropy(labels, logits) == pytest.approx(expected, rel=1e-6)
    assert float(MaskedSparseCrossEntropy()(np.array([-1, -1]), logits[:2])) == 0.0
