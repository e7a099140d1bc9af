"""Local feature selection against an independent numpy computation, eagerly and in a graph."""

import numpy as np
import pytest
import tensorflow as tf

from tfmet.descriptors import local


def _numpy_select(feature_map, cell_size, long_side, num, projection):
    """Per image: cells by descending norm, centre points, projected + L2-normalised rows."""
    out = []
    for image in feature_map:
        h, w, c = image.shape
        cells = [(np.linalg.norm(image[i, j]), i, j) for i in range(h) for j in range(w)]
        cells.sort(key=lambda t: -t[0])
        cells = cells[:num]
        rows = np.stack([image[i, j] for _, i, j in cells])
        if projection is not None:
            rows = rows @ projection
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        points = np.array(
            [[(j + 0.5) * cell_size[1], (i + 0.5) * cell_size[0]] for _, i, j in cells]
        )
        out.append((points / long_side, rows, np.array([t[0] for t in cells])))
    return out


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("dim", [3, 8])
def test_select_equals_numpy(graph, dim):
    rng = np.random.default_rng(0)
    feature_map = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    projection = local.projection_matrix(6, dim, seed=1)
    assert (projection is None) == (dim >= 6)
    # An image of 60 x 100 pixels over a 3 x 4 map: cells of 20 x 25 pixels.
    select = lambda m: local.select(m, (20.0, 25.0), 100.0, 5, projection)  # noqa: E731
    if graph:
        select = tf.function(select, input_signature=[tf.TensorSpec([None, None, None, 6])])
    points, descriptors, scores = (t.numpy() for t in select(feature_map))
    expected = _numpy_select(feature_map, (20.0, 25.0), 100.0, 5, projection)
    for b, (want_points, want_rows, want_scores) in enumerate(expected):
        np.testing.assert_allclose(points[b], want_points, rtol=1e-6)
        np.testing.assert_allclose(descriptors[b], want_rows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores[b], want_scores, rtol=1e-6)
    # The top cell of image 0 by hand: its centre, in fractions of the long side (100 px).
    i, j = divmod(int(np.argmax(np.linalg.norm(feature_map[0], axis=-1))), 4)
    np.testing.assert_allclose(points[0, 0], [(j + 0.5) * 0.25, (i + 0.5) * 0.2], rtol=1e-6)


def test_fewer_cells_than_asked():
    points, descriptors, scores = local.select(np.ones((1, 2, 2, 4), np.float32), (1, 1), 2, 10)
    assert points.shape == (1, 4, 2) and descriptors.shape == (1, 4, 4) and scores.shape == (1, 4)
    np.testing.assert_allclose(scores.numpy(), 2.0)


def test_projection_is_orthonormal_and_seeded():
    q = local.projection_matrix(64, 16, seed=3)
    np.testing.assert_allclose(q.T @ q, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(q, local.projection_matrix(64, 16, seed=3))
    assert not np.array_equal(q, local.projection_matrix(64, 16, seed=4))
    assert local.projection_matrix(16, 16) is None
    with pytest.raises(ValueError, match="`dim` must be positive"):
        local.projection_matrix(8, 0)


def test_merge_keeps_the_best_of_every_scale():
    a = (np.zeros((1, 3, 2)), np.eye(3, 4)[None], np.array([[9.0, 5.0, 1.0]]))
    b = (np.ones((1, 2, 2)), np.eye(2, 4)[None] * 2, np.array([[7.0, 6.0]]))
    cast = lambda s: tuple(tf.constant(x, tf.float32) for x in s)  # noqa: E731
    points, descriptors, scores = local.merge([cast(a), cast(b)], 3)
    np.testing.assert_array_equal(scores.numpy(), [[9.0, 7.0, 6.0]])
    np.testing.assert_array_equal(points.numpy(), [[[0, 0], [1, 1], [1, 1]]])
    np.testing.assert_array_equal(descriptors.numpy()[0, :, :2], [[1, 0], [2, 0], [0, 2]])


def _extractor(backbone, scales, num=20, dim=16):
    from tfmet.descriptors.embedder import DescriptorExtractor, Embedder

    embedder = Embedder.from_registry(backbone) if isinstance(backbone, str) else backbone
    spec = local.LocalSpec(num=num, dim=dim, seed=0)
    return DescriptorExtractor(embedder, scales=scales, local=spec)


@pytest.mark.parametrize(
    "backbone",
    ["resnet_tiny", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)],  # full-size: slow
)
def test_extract_local_gives_the_global_descriptors_and_the_family_map(backbone):
    import keras

    from tfmet.backbones import registry

    keras.utils.set_random_seed(0)
    extractor = _extractor(backbone, scales=(1.0, 0.5))
    images = np.random.default_rng(0).uniform(0, 255, (1, 70, 90, 3)).astype(np.float32)
    descriptors, points, rows, scores = (t.numpy() for t in extractor.extract_local(images))
    np.testing.assert_allclose(descriptors, extractor(images).numpy(), atol=1e-6)
    assert rows.shape == (1, 20, 16) and points.shape == (1, 20, 2)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, rtol=1e-5)
    assert (np.diff(scores[0]) <= 0).all() and (points >= 0).all() and (points <= 1).all()
    # Scale 1 alone, by hand: the family's stride-16 layer, its strongest cells in numpy.
    backbone_model = extractor.embedder.backbone
    family = registry.family_of(backbone_model)
    layer = backbone_model.get_layer(family.local_layer(backbone_model))
    view = keras.Model(backbone_model.inputs, layer.output)
    feature_map = view(extractor.embedder.preprocess(images)).numpy()
    assert feature_map.shape[1:3] == (5, 6)  # stride 16: ceil(70 / 16), ceil(90 / 16)
    single = _extractor(extractor.embedder, scales=(1.0,))
    _, points1, rows1, scores1 = (t.numpy() for t in single.extract_local(images))
    ((want_points, want_rows, want_scores),) = _numpy_select(
        feature_map, (70 / 5, 90 / 6), 90.0, 20, single._projection
    )
    np.testing.assert_allclose(scores1[0], want_scores, rtol=1e-5)
    np.testing.assert_allclose(points1[0], want_points, rtol=1e-5)
    np.testing.assert_allclose(rows1[0], want_rows, atol=1e-5)


def test_extract_local_of_a_vit_uses_its_patch_tokens(tmp_path):
    pytest.importorskip("transformers")
    from tests.kit.vit_models import make_model
    from tfmet.descriptors.embedder import Embedder

    make_model("dinov2_with_registers", tmp_path / "vit")
    embedder = Embedder.from_registry(f"hf:{tmp_path / 'vit'}")
    extractor = _extractor(embedder, scales=(1.0,), num=50, dim=64)
    images = np.random.default_rng(1).uniform(0, 255, (1, 30, 44, 3)).astype(np.float32)
    descriptors, points, rows, scores = (t.numpy() for t in extractor.extract_local(images))
    np.testing.assert_allclose(descriptors, extractor(images).numpy(), atol=1e-6)
    assert extractor._projection is None  # 32 channels <= 64: kept as they are
    tokens = embedder.backbone(embedder.preprocess(images)).numpy()[0, 3:]  # cls + 2 registers
    grid = tokens.reshape(4, 6, 32)  # patch 7: 30 // 7 rows, 44 // 7 columns
    ((want_points, want_rows, want_scores),) = _numpy_select(grid[None], (7, 7), 44.0, 50, None)
    assert rows.shape == (1, 24, 32)  # all 24 patches, fewer than the 50 asked
    np.testing.assert_allclose(scores[0], want_scores, rtol=1e-5)
    np.testing.assert_allclose(points[0], want_points, rtol=1e-5)
    np.testing.assert_allclose(rows[0], want_rows, atol=1e-5)


def test_a_family_without_local_features_says_so():
    from tests.kit.models import tiny_backbone
    from tfmet.descriptors.embedder import Embedder

    with pytest.raises(ValueError, match=r"no local features"):
        _extractor(Embedder(tiny_backbone()), scales=(1.0,))
