"""The searcher interface: every backend against numpy brute force, its save / load round trip,
its in-graph form, the registry's errors; and the one confidence rule, numpy and TensorFlow."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from tests.kit.references import brute_force, rule_by_loop, unit
from tfmet.retrieval import (
    SEARCHERS,
    ExactSearcher,
    KnnClassifier,
    ScannConfig,
    ScannSearcher,
    knn_confidence,
    load_searcher,
    make_searcher,
)
from tfmet.retrieval.searchers import DATABASE_FILE, MANIFEST

K = 10
# "scann" configured to be exact: every leaf of the tree searched, every row reordered exactly.
# ScaNN's brute force (no tree, no AH) is ScannConfig(), ScannConfig.for_size below 20k rows.
SCANN_EXACT = ScannConfig(
    num_leaves=8, num_leaves_to_search=8, spherical=True, use_ah=True, reorder=600,
    training_sample_size=600,
)  # fmt: skip
CASES = {
    "exact": lambda: ExactSearcher(shard_rows=128),  # 5 shards merged
    "scann brute force": lambda: ScannSearcher(),
    "scann tree + AH, all leaves": lambda: ScannSearcher(SCANN_EXACT),
}


def _data(seed=0, n=600, q=40, d=16):
    rng = np.random.default_rng(seed)
    database, queries = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(q, d)))
    top, order, scores = brute_force(database, queries, K + 1)
    # The premise of comparing orders: no two of the top k + 1 are closer than float32 noise.
    assert np.min(-np.diff(top, axis=1)) > 1e-5
    return database, queries, top[:, :K], order[:, :K]


def test_registry_holds_the_two_backends():
    assert list(SEARCHERS) == ["exact", "scann"]
    assert SEARCHERS["exact"] is ExactSearcher and SEARCHERS["scann"] is ScannSearcher
    assert not ExactSearcher.approximate and ScannSearcher.approximate
    assert isinstance(make_searcher("scann", {"use_ah": True}).config, ScannConfig)


def test_unknown_backend_is_a_clear_error():
    message = "unknown search backend 'faiss': the known backends are 'exact', 'scann'"
    with pytest.raises(ValueError, match=message):
        make_searcher("faiss")
    with pytest.raises(ValueError, match=message):
        KnnClassifier(backend="faiss")
    with pytest.raises(ValueError, match="'exact' searcher takes no config"):
        make_searcher("exact", {"use_ah": True})


@pytest.mark.parametrize("case", list(CASES))
def test_search_equals_numpy_brute_force(case):
    database, queries, expected_sims, expected_idx = _data()
    searcher = CASES[case]().build(database)
    sims, idx = searcher.search(queries, K)
    assert idx.dtype == np.int64 and sims.dtype == np.float32 and idx.shape == (40, K)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_gives_identical_results(tmp_path, case):
    database, queries, _, _ = _data(1)
    searcher = CASES[case]().build(database)
    before = searcher.search(queries, K)
    searcher.save(tmp_path / "index")
    loaded = load_searcher(tmp_path / "index")
    assert type(loaded) is type(searcher) and loaded.config == searcher.config
    assert (loaded.size, loaded.dim) == (600, 16)
    for got, expected in zip(loaded.search(queries, K), before, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_an_exact_index_in_the_earlier_format_loads(tmp_path):
    """An index written before the searcher interface (the same manifest, by hand) loads."""
    database, queries, expected_sims, expected_idx = _data(2)
    folder = tmp_path / "index"
    folder.mkdir()
    np.save(folder / DATABASE_FILE, database)
    manifest = {"format": "tfmet-knn-index", "backend": "exact", "size": 600, "dim": 16,
                "config": None, "shard_rows": 32768}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_searcher(folder)
    assert isinstance(loaded, ExactSearcher)
    sims, idx = loaded.search(queries, K)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-5)


def test_a_manifest_naming_an_unknown_backend_is_refused(tmp_path):
    ExactSearcher().build(_data()[0]).save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    (tmp_path / "index" / MANIFEST).write_text(json.dumps(dict(manifest, backend="annoy")))
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        load_searcher(tmp_path / "index")


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_in_graph_search_equals_numpy_brute_force(backend):
    database, queries, expected_sims, expected_idx = _data(3)
    module = make_searcher(backend).in_graph(database, K)
    assert module.config == (None if backend == "exact" else ScannConfig.for_size(600))
    sims, idx = tf.function(module)(tf.constant(queries))
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(sims.numpy(), expected_sims, rtol=1e-5, atol=1e-5)


# -- the one confidence rule ------------------------------------------------------------------


def _both(similarities, labels, num_classes, tau, valid=None, top_k=None):
    """knn_confidence on numpy arrays and on tensors (in a tf.function), as numpy results."""
    numpy_out = knn_confidence(similarities, labels, num_classes, tau, valid, top_k)
    tensors = [tf.constant(np.asarray(x)) for x in (similarities, labels)]
    mask = None if valid is None else tf.constant(np.asarray(valid))

    @tf.function
    def graph(sims, labs):
        return knn_confidence(sims, labs, num_classes, tau, mask, top_k)

    tf_out = [x.numpy() for x in graph(*tensors)]
    return numpy_out, tf_out


def test_hand_example_in_numpy_and_tensorflow():
    # Neighbours: label 7 (0.9), label 3 (0.9), label 7 (0.5), label 5 (-0.2); 6 classes, tau 2.
    # Scores: 3 -> 0.9, 7 -> 0.9, 5 -> max(-0.2, 0) = 0, three absent classes -> 0.
    # Tie at 0.9 -> the smaller label 3; p = e^1.8 / (2 e^1.8 + 4 e^0).
    (pred, conf, ids, probs), tf_out = _both(
        [[0.9, 0.9, 0.5, -0.2]], [[7, 3, 7, 5]], 6, 2.0, top_k=3
    )
    p_top = math.exp(1.8) / (2 * math.exp(1.8) + 4)
    p_zero = 1 / (2 * math.exp(1.8) + 4)
    assert pred.tolist() == [3] and ids.tolist() == [[3, 7, 5]]
    np.testing.assert_allclose(conf, [p_top], rtol=1e-12)
    np.testing.assert_allclose(probs, [[p_top, p_top, p_zero]], rtol=1e-12)
    assert tf_out[0].tolist() == [3] and tf_out[2].tolist() == [[3, 7, 5]]
    np.testing.assert_allclose(tf_out[1], [p_top], rtol=1e-6)
    np.testing.assert_allclose(tf_out[3], [[p_top, p_top, p_zero]], rtol=1e-6)


def test_without_top_k_both_return_pred_and_conf():
    numpy_out, tf_out = _both([[0.5, 0.4]], [[1, 2]], 3, 1.0)
    assert len(numpy_out) == len(tf_out) == 2
    expected = math.exp(0.5) / (math.exp(0.5) + math.exp(0.4) + 1)
    np.testing.assert_allclose([numpy_out[1][0], tf_out[1][0]], [expected, expected], rtol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.01, 1.0, 30.0, 500.0])
def test_numpy_and_tensorflow_give_the_same_numbers(tau):
    rng = np.random.default_rng(int(tau * 100))
    sims = rng.uniform(-0.4, 1.0, (64, 7))
    sims[0] = -0.2  # no positive similarity at all: every class scores 0
    sims[1, 3] = sims[1, 1]  # an exact tie between two labels
    labels = rng.integers(100, 106, (64, 7))
    valid = rng.random((64, 7)) > 0.2
    valid[2] = False  # no neighbour at all: pred -1, conf 0
    for mask in (None, valid):
        numpy_out, tf_out = _both(sims, labels, 40, tau, mask, top_k=5)
        np.testing.assert_array_equal(tf_out[0], numpy_out[0])
        np.testing.assert_array_equal(tf_out[2], numpy_out[2])
        np.testing.assert_allclose(tf_out[1], numpy_out[1], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(tf_out[3], numpy_out[3], rtol=1e-6, atol=1e-12)
    # Both equal the rule written out as a loop, over the neighbours left by the mask.
    unmasked, _ = _both(sims, labels, 40, tau)
    ref_pred, ref_conf = rule_by_loop(sims, labels, 40, tau)
    np.testing.assert_array_equal(unmasked[0], ref_pred)
    np.testing.assert_allclose(unmasked[1], ref_conf, rtol=1e-9)
    masked, _ = _both(sims, labels, 40, tau, valid)
    for row, kept in enumerate(valid):
        if not kept.any():
            assert (masked[0][row], masked[1][row]) == (-1, 0.0)
            continue
        pred, conf = rule_by_loop(sims[row : row + 1, kept], labels[row : row + 1, kept], 40, tau)
        assert masked[0][row] == pred[0]
        np.testing.assert_allclose(masked[1][row], conf[0], rtol=1e-9)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_exact_gemm_search_equals_numpy_brute_force_with_ties(k):
    # Integer-valued vectors: many exact ties, which must go to the smaller index across shards
    # and query blocks (more queries than QUERY_BLOCK, shards smaller than the database).
    rng = np.random.default_rng(3)
    database = rng.integers(-2, 3, (3000, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, (700, 8)).astype(np.float32)
    similarities, indices = ExactSearcher(shard_rows=700).build(database).search(queries, k)
    scores = queries @ database.T
    columns = np.broadcast_to(np.arange(database.shape[0]), scores.shape)
    order = np.lexsort((columns, -scores), axis=1)[:, :k]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(similarities, np.take_along_axis(scores, order, 1))
