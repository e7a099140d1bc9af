"""A reduced-precision descriptor export: the SavedModel computes what the bfloat16 extractor
computes and its metadata records the precision."""

import json
import os

import numpy as np
import tensorflow as tf

from tfmet.backbones.precision import precision_version
from tfmet.descriptors import extraction
from tfmet.export import builders
from tfmet.export.common import save_module


def test_bfloat16_descriptor_export_matches_the_extractor_and_records_precision(tmp_path):
    extractor, spec = extraction.build_extractor("resnet_tiny", seed=0, precision="bfloat16")
    rng = np.random.default_rng(0)
    module, metadata = builders.build_descriptor(extractor, spec, pca=None)
    assert metadata["precision"] == "bfloat16"
    path = save_module(module, tmp_path / "export", module.signatures(), metadata)
    with open(os.path.join(path, "assets", "tfmet_metadata.json")) as f:
        recorded = json.load(f)
    assert recorded["precision"] == "bfloat16" and recorded[
        "precision_version"
    ] == precision_version("bfloat16")
    images = rng.uniform(0, 255, size=(1, 40, 52, 3)).astype(np.float32)
    loaded = tf.saved_model.load(path).signatures["images"]
    served = loaded(images=tf.constant(images))["descriptor"].numpy()
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, extractor(images).numpy(), atol=1e-6)
    float32, _ = extraction.build_extractor("resnet_tiny", seed=0)
    assert not np.array_equal(served, float32(images).numpy())  # bfloat16 was baked in
