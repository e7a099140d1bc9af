"""Nearest paintings and outlier scores against numpy brute force."""

import csv

import numpy as np
import pytest

from tfmet.retrieval import embedding_tools


def numpy_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nearest_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    scores, indices = embedding_tools.nearest(database, queries, 7)
    expected = np.sort(queries @ database.T, axis=1)[:, ::-1][:, :7]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    # The returned indices score what they claim.
    np.testing.assert_allclose(
        np.take_along_axis(queries @ database.T, indices, axis=1), scores, rtol=1e-5, atol=1e-5
    )
    _, small_indices = embedding_tools.nearest(database[:3], queries, 7)
    assert small_indices.shape == (20, 3)  # k clipped to the database size
    with pytest.raises(ValueError, match="same width"):
        embedding_tools.nearest(database, queries[:, :4], 3)


def test_nearest_paintings_cosine():
    features = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], np.float32)
    index = embedding_tools.NearestPaintings(features, ["a.jpg", "b.jpg", "c.jpg"], ["x", "y", "x"])
    (result,) = index.query(np.array([[2.0, 1.0]], np.float32), k=2)
    # cos with a = 2/sqrt(5) = 0.894, with c = 3/sqrt(10) = 0.949, with b = 1/sqrt(5) = 0.447
    assert [(p, label) for p, label, _ in result] == [("c.jpg", "x"), ("a.jpg", "x")]
    np.testing.assert_allclose(
        [s for _, _, s in result], [3 / np.sqrt(10), 2 / np.sqrt(5)], rtol=1e-5
    )
    with pytest.raises(ValueError, match="differ in length"):
        embedding_tools.NearestPaintings(features, ["a.jpg"])


def numpy_outliers(features, labels, k):
    features = numpy_normalize(features)
    out = np.full(len(features), np.nan)
    for i in range(len(features)):
        if labels[i] < 0:
            continue
        same = [j for j in range(len(features)) if labels[j] == labels[i] and j != i]
        if not same:
            continue
        distances = np.sort(1.0 - features[same] @ features[i])[: min(k, len(same))]
        out[i] = distances.mean()
    return out


def test_outlier_scores_against_numpy():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 12 + [1] * 5 + [2] + [-1] * 2)
    centres = rng.normal(size=(3, 8)) * 3
    features = centres[np.maximum(labels, 0)] + rng.normal(size=(20, 8))
    features[3] = -centres[0]  # an obvious outlier of class 0
    scores = embedding_tools.outlier_scores(features.astype(np.float32), labels, k=4)
    expected = numpy_outliers(features, labels, 4)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert np.isnan(scores[17]) and np.isnan(scores[18:]).all()  # singleton, unlabelled
    assert int(np.nanargmax(scores[:12])) == 3
    as_strings = np.where(labels >= 0, labels.astype(str), "")
    np.testing.assert_allclose(
        embedding_tools.outlier_scores(features, as_strings, k=4),
        expected,
        rtol=1e-4,
        atol=1e-5,
        equal_nan=True,
    )


def test_outlier_csv_ranking(tmp_path):
    path = str(tmp_path / "outliers.csv")
    order = embedding_tools.write_outlier_csv(
        path, ["a", "b", "c", "d"], ["x", "x", "y", "z"], [0.1, float("nan"), 0.7, 0.1]
    )
    assert order == [2, 0, 3, 1]  # highest first, ties by position, NaN last
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["rank", "path", "label", "score"]
    assert rows[1] == ["1", "c", "y", "0.700000"] and rows[4] == ["4", "b", "x", ""]


def test_nearest_returns_similarities_then_indices_like_every_search():
    rng = np.random.default_rng(3)
    database = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    similarities, indices = embedding_tools.nearest(database, queries, 6)
    brute = queries @ database.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :6]
    np.testing.assert_allclose(similarities, np.take_along_axis(brute, expected, 1), rtol=1e-5)
    np.testing.assert_array_equal(indices, expected)


def test_one_numpy_l2_normalisation():
    from tfmet.retrieval import l2_normalize_rows

    rows = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(l2_normalize_rows(rows), [[0.6, 0.8], [0.0, 0.0]])
    normalized = embedding_tools.normalize_rows(rows)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, [[0.6, 0.8], [0.0, 0.0]])
