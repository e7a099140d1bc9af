"""A reduced-precision descriptor export: the SavedModel computes what the bfloat16 extractor
computes and its metadata records the precision."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfmet.backbones import efficientnet_lite
from tfmet.descriptors import spec as spec_lib
from tfmet.export import builders
from tfmet.export.common import save_module
from tfmet.precision import precision_version


# resnet_tiny, and EfficientNet-Lite0 with its packaged ImageNet weights (random ones give it a
# near-constant descriptor, which hides what a precision changes): its float32 stem and first
# block under bfloat16 are saved as such.
@pytest.mark.parametrize(
    "backbone, precision",
    [
        ("resnet_tiny", "bfloat16"),
        # full-size EfficientNet-Lite0 exports (~160 s each on the busy 2-core machine): slow
        pytest.param("efficientnet_lite0", "bfloat16", marks=pytest.mark.slow),
        pytest.param("efficientnet_lite0", "float16", marks=pytest.mark.slow),
    ],
)
def test_reduced_precision_descriptor_export_matches_the_extractor_and_records_it(
    tmp_path, backbone, precision
):
    weights = efficientnet_lite.pretrained_weights() if backbone == "efficientnet_lite0" else None
    extractor, spec = spec_lib.build_extractor(backbone, weights, precision=precision)
    rng = np.random.default_rng(0)
    module, metadata = builders.build_descriptor(extractor, spec, pca=None)
    assert metadata["precision"] == precision
    path = save_module(module, tmp_path / "export", module.signatures(), metadata)
    with open(os.path.join(path, "assets", "tfmet_metadata.json")) as f:
        recorded = json.load(f)
    assert recorded["precision"] == precision
    assert recorded.get("precision_version", 1) == precision_version(precision)
    images = rng.uniform(0, 255, size=(1, 40, 52, 3)).astype(np.float32)
    loaded = tf.saved_model.load(path).signatures["images"]
    served = loaded(images=tf.constant(images))["descriptor"].numpy()
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, extractor(images).numpy(), atol=1e-6)
    float32, _ = spec_lib.build_extractor(backbone, weights)
    assert not np.array_equal(served, float32(images).numpy())  # the precision was baked in
