import math
import os

import keras
import numpy as np
import pytest

from tests.kit import tiny_backbone
from tests.kit.references import numpy_gem as numpy_gem_l2
from tests.kit.references import numpy_torch_bilinear
from tfmet.backbones import IMAGENET_TORCH
from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder


def numpy_normalise(image):
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return (image / 255.0 - mean) / std


def test_met_scales():
    # The reference writes [1, 1/np.sqrt(2), 1/2]; 2**-0.5 differs from that in the last bit.
    assert MET_SCALES == (1.0, 1 / np.sqrt(2), 0.5)


def test_embedder_is_l2_gem_of_backbone_features():
    backbone = tiny_backbone()
    embedder = Embedder(backbone, preprocessing=IMAGENET_TORCH)
    images = np.random.default_rng(0).uniform(0, 255, (2, 33, 27, 3)).astype(np.float32)
    normalised = numpy_normalise(images)
    np.testing.assert_allclose(embedder.preprocess(images).numpy(), normalised, atol=1e-5)
    expected = numpy_gem_l2(backbone(normalised).numpy())
    np.testing.assert_allclose(embedder(normalised).numpy(), expected, atol=1e-6)
    assert embedder.output_dim == 8


def test_multiscale_is_l2_of_mean_of_per_scale_descriptors():
    backbone = tiny_backbone(seed=1)
    embedder = Embedder(backbone, preprocessing=IMAGENET_TORCH)
    extractor = DescriptorExtractor(embedder)
    image = np.random.default_rng(1).uniform(0, 255, (37, 29, 3)).astype(np.float32)
    normalised = numpy_normalise(image)
    per_scale = []
    for s in (1.0, 1 / math.sqrt(2), 0.5):
        resized = normalised if s == 1.0 else numpy_torch_bilinear(normalised, s)
        per_scale.append(numpy_gem_l2(backbone(resized[None]).numpy())[0])
    mean = np.mean(per_scale, axis=0)
    expected = mean / np.linalg.norm(mean)
    np.testing.assert_allclose(extractor(image[None]).numpy()[0], expected, atol=1e-5)
    # Other sizes reuse the same trace (input_signature with None dims).
    extractor(np.zeros((1, 101, 77, 3), np.float32))
    assert extractor.extract.experimental_get_tracing_count() == 1

    single = DescriptorExtractor(embedder, scales=(1.0,))
    np.testing.assert_allclose(single(image[None]).numpy()[0], per_scale[0], atol=1e-5)


def test_projector_path_and_keras_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    embedder = Embedder(tiny_backbone(seed=2), p=2.0, projector_dim=4, preprocessing=IMAGENET_TORCH)
    embedder.build((None, None, None, 3))
    mean, projection = rng.normal(size=8), rng.normal(size=(8, 4))
    embedder.projector.set_pca(mean, projection)
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    gem = numpy_gem_l2(embedder.backbone(x).numpy(), p=2.0)
    projected = (gem - mean) @ projection
    expected = projected / np.linalg.norm(projected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embedder(x).numpy(), expected, atol=1e-5)

    path = os.path.join(tmp_path, "embedder.keras")
    embedder.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-5)
    assert loaded.preprocessing == IMAGENET_TORCH and loaded.projector_dim == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="projector_dim"):
        Embedder(tiny_backbone(), projector_dim=0)
    with pytest.raises(ValueError, match="resize_method"):
        DescriptorExtractor(Embedder(tiny_backbone()), resize_method="area")
