"""Converted embedder files (GeM p, projector) reach extraction through build_extractor."""

import numpy as np

from tfmet.backbones import torch_convert
from tfmet.descriptors.embedder import Embedder
from tfmet.descriptors.spec import build_extractor


def test_build_extractor_reads_an_embedder_file_with_its_p_and_projector(tmp_path):
    embedder = Embedder.from_registry("resnet_tiny", projector_dim=6, p=4.5)
    embedder.build((None, None, None, 3))
    rng = np.random.default_rng(0)
    embedder.projector.set_weights([rng.normal(size=w.shape) for w in embedder.projector.weights])
    path = torch_convert.save_weights(
        embedder,
        str(tmp_path / "e.weights.h5"),
        kind="embedder",
        arch="resnet_tiny",
        projector_dim=6,
        p=4.5,
    )
    extractor, spec = build_extractor(backbone="resnet_tiny", weights=path, scales=(1.0,))
    assert spec.dim == 6 and spec.weights.startswith("sha256:")
    loaded = extractor.embedder
    np.testing.assert_allclose(np.asarray(loaded.pool.power), 4.5, rtol=1e-6)
    image = rng.uniform(0, 255, size=(1, 33, 41, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded(loaded.preprocess(image)), embedder(embedder.preprocess(image)), atol=1e-6
    )
