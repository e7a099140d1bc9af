"""The kNN confidence rule, exact search vs numpy brute force, ScaNN recall, index save/load."""

import dataclasses
import math

import numpy as np
import pytest

from tests.kit.references import brute_force as _brute_force
from tests.kit.references import clustered as _clustered
from tests.kit.references import rule_by_loop as _rule_by_loop
from tests.kit.references import unit as _unit
from tfmet.retrieval import (
    ExactSearcher,
    KnnClassifier,
    KnnSearch,
    ScannConfig,
    ScannSearcher,
    knn_confidence,
)
from tfmet.retrieval.recall import recall_at_k
from tfmet.retrieval.scann_build import build_tree_by_chunks, evenly_spaced_rows


def test_hand_made_rule():
    # Label 7 scores 0.5, label 3 0.4, label 9 max(-0.2, 0) = 0; 7 absent classes score 0.
    pred, conf = knn_confidence([[0.5, 0.4, 0.3, -0.2]], [[7, 3, 7, 9]], num_classes=10, tau=2.0)
    expected = math.exp(1.0) / (math.exp(1.0) + math.exp(0.8) + 1.0 + 7.0)
    assert pred.tolist() == [7]
    assert conf[0] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.2100061, rel=1e-6)


def test_negative_similarities_and_ties():
    # Only negative similarities: every class scores 0 -> conf 1/N, the smallest present label.
    pred, conf = knn_confidence([[-0.1, -0.3]], [[4, 2]], num_classes=5, tau=10.0)
    assert pred.tolist() == [2] and conf[0] == pytest.approx(0.2, rel=1e-12)
    # Equal best similarities: the smaller label wins.
    pred, conf = knn_confidence([[0.6, 0.6, 0.1]], [[8, 5, 1]], num_classes=3, tau=1.0)
    assert pred.tolist() == [5]
    assert conf[0] == pytest.approx(math.exp(0.6) / (2 * math.exp(0.6) + math.exp(0.1)))


def test_large_tau_is_stable():
    # tau * s = 450 and 750 overflow float32 (and 750 float64) in a naive softmax.
    n = 224_408
    for sims in ([0.9, 0.2], [1.5, 1.4]):
        pred, conf = knn_confidence([sims], [[11, 12]], num_classes=n, tau=500.0)
        _, expected = _rule_by_loop([sims], [[11, 12]], n, 500.0)
        assert np.isfinite(conf[0]) and conf[0] == pytest.approx(expected[0], rel=1e-12)
        assert pred.tolist() == [11]
    pred, conf = knn_confidence([[0.01]], [[3]], num_classes=n, tau=500.0)
    expected = math.exp(5.0) / (math.exp(5.0) + (n - 1))
    assert conf[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.01, 1.0, 30.0, 500.0])
def test_random_rows_against_loop(tau):
    rng = np.random.default_rng(int(tau * 100))
    similarities = np.round(rng.uniform(-0.5, 1.0, (40, 10)), 3)  # some exact ties
    labels = rng.integers(0, 6, (40, 10))
    pred, conf = knn_confidence(similarities, labels, num_classes=9, tau=tau)
    expected_pred, expected_conf = _rule_by_loop(similarities, labels, 9, tau)
    np.testing.assert_array_equal(pred, expected_pred)
    np.testing.assert_allclose(conf, expected_conf, rtol=1e-12)


def test_padding_is_ignored():
    pred, conf = knn_confidence(
        [[0.5, -np.inf], [-np.inf, -np.inf]],
        [[3, 0], [0, 0]],
        num_classes=4,
        tau=1.0,
        valid=[[True, False], [False, False]],
    )
    assert pred.tolist() == [3, -1]
    assert conf[0] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 3)) and conf[1] == 0.0


def _queries_with_truth(database, centres, noise, seed, k, count=60):
    """`count` queries near random centres and numpy's exact top `k` (sims, indices) for them,
    checked free of near-ties around the k-th neighbour so the neighbour sets are well defined."""
    rng = np.random.default_rng(seed)
    near = centres[rng.integers(0, len(centres), count)]
    queries = _unit(near + noise * rng.normal(size=(count, centres.shape[1])))
    expected_sims, expected_idx, scores = _brute_force(database, queries, k)
    ranked = -np.sort(-scores, axis=1)
    assert np.min(ranked[:, k - 1] - ranked[:, k]) > 1e-6
    return queries, expected_sims, expected_idx


def test_exact_backend_equals_numpy_brute_force():
    database, owner, centres = _clustered(0, 2000, 24, 40, 0.8)
    k = 10
    queries, expected_sims, expected_idx = _queries_with_truth(database, centres, 0.8, 1, k)
    index = ExactSearcher(shard_rows=300).build(database)  # 7 shards merged
    sims, idx = index.search(queries, k)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-6)

    labels = 1000 + owner
    classifier = KnnClassifier(k=k, tau=20.0).fit(database, labels)
    pred, conf = classifier.predict(queries)
    expected_pred, expected_conf = _rule_by_loop(
        expected_sims, labels[expected_idx], np.unique(labels).size, 20.0
    )
    np.testing.assert_array_equal(pred, expected_pred)
    np.testing.assert_allclose(conf, expected_conf, rtol=1e-5)


def test_scann_defaults_recall_at_10():
    # Over 20k points ScaNN's rules of thumb switch from brute force to AH + reordering.
    database, _, centres = _clustered(2, 24_000, 32, 300, 0.5)
    rng = np.random.default_rng(3)
    queries = _unit(centres[rng.integers(0, 300, 200)] + 0.5 * rng.normal(size=(200, 32)))
    index = ScannSearcher().build(database)
    assert index.config.use_ah and index.config.num_leaves == 0
    _, found = index.search(queries, 10)
    _, expected, _ = _brute_force(database, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected, strict=True)])
    assert recall >= 0.95


def test_scann_config_for_size_follows_rules_of_thumb():
    assert not ScannConfig.for_size(19_999).use_ah
    mid = ScannConfig.for_size(50_000)
    assert mid.use_ah and mid.num_leaves == 0 and mid.reorder > 0
    big = ScannConfig.for_size(397_121)
    assert big.num_leaves == 630 and big.num_leaves_to_search == 158 and big.spherical


def test_tree_search_recall_and_padding():
    database, _, centres = _clustered(4, 3000, 16, 30, 0.3)
    rng = np.random.default_rng(5)
    queries = _unit(centres[rng.integers(0, 30, 50)] + 0.3 * rng.normal(size=(50, 16)))
    config = ScannConfig(30, 10, spherical=True, use_ah=True, reorder=100)
    index = ScannSearcher(config).build(database)
    _, found = index.search(queries, 10)
    _, expected, _ = _brute_force(database, queries, 10)
    assert (
        np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected, strict=True)]) >= 0.95
    )
    # One leaf of ~100 points cannot supply 500 neighbours: the rest is padding.
    narrow = ScannSearcher(ScannConfig(30, 1, use_ah=True, reorder=600)).build(database)
    sims, idx = narrow.search(queries, 500)
    assert np.any(idx == -1) and np.all(np.isneginf(sims[idx == -1]))
    assert np.all(idx[idx >= 0] < 3000)


def _memmap(tmp_path, x):
    np.save(tmp_path / "database.npy", x)
    return np.load(tmp_path / "database.npy", mmap_mode="r")


def test_exact_search_of_a_memmap_equals_in_memory_search_bit_for_bit(tmp_path):
    database, _, centres = _clustered(7, 1000, 16, 20, 0.5)
    queries = _unit(
        centres[np.arange(30) % 20] + 0.5 * np.random.default_rng(8).normal(size=(30, 16))
    )
    mapped = ExactSearcher(shard_rows=300).build(_memmap(tmp_path, database))
    # Kept as the memmap (read shard by shard with file reads), not materialised.
    assert isinstance(mapped._database, np.memmap)
    in_memory = ExactSearcher(shard_rows=300).build(database)
    pairs = zip(mapped.search(queries, 10), in_memory.search(queries, 10), strict=True)
    for got, expected in pairs:
        np.testing.assert_array_equal(got, expected)


def test_evenly_spaced_rows_of_a_memmap(tmp_path):
    database, _, _ = _clustered(9, 1000, 8, 5, 0.5)
    picks = np.unique(np.linspace(0, 999, 70).round().astype(np.int64))
    got = evenly_spaced_rows(_memmap(tmp_path, database), 70, chunk_rows=128)
    np.testing.assert_array_equal(got, database[picks])
    np.testing.assert_array_equal(evenly_spaced_rows(database, 5000), database)


@pytest.mark.parametrize("use_ah", [False, True])
def test_tree_built_by_chunks_finds_numpy_brute_force_neighbours(tmp_path, use_ah):
    # The tree is trained on 500 of 3000 rows; the rows go in 7 chunks of 450. Ids must be the
    # row numbers, and searching every leaf must find numpy's exact neighbours.
    database, _, centres = _clustered(10, 3000, 16, 30, 0.4)
    k = 10
    queries, expected_sims, expected_idx = _queries_with_truth(database, centres, 0.4, 11, k)
    config = ScannConfig(
        30, 30, spherical=True, use_ah=use_ah, reorder=3000, training_sample_size=500
    )
    searcher = build_tree_by_chunks(_memmap(tmp_path, database), config, chunk_rows=450)
    assert searcher.size() == 3000
    idx, sims = searcher.search_batched(queries, k, 3000 if use_ah else None, 30)
    assert recall_at_k(idx, expected_idx, k) == 1.0
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(expected_idx, axis=1))
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-5)
    # Through ScannSearcher (one chunk), fewer leaves: recall measured as numpy measures it.
    narrow = dataclasses.replace(config, num_leaves_to_search=3, reorder=100)
    _, found = ScannSearcher(narrow).build(database).search(queries, k)
    numpy_recall = np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(found, expected_idx, strict=True)]
    )
    assert recall_at_k(found, expected_idx, k) == pytest.approx(numpy_recall)
    assert 0.5 < numpy_recall


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_classifier_save_load(tmp_path, backend):
    database, owner, _ = _clustered(6, 25_000 if backend == "scann" else 500, 16, 50, 0.5)
    classifier = KnnClassifier(k=5, tau=10.0, backend=backend).fit(database, owner)
    queries = database[:20] + 0.01
    pred, conf = classifier.predict(queries)
    classifier.save(tmp_path / "knn")
    loaded = KnnClassifier.load(tmp_path / "knn")
    assert (loaded.k, loaded.tau, loaded.backend) == (5, 10.0, backend)
    loaded_pred, loaded_conf = loaded.predict(queries)
    np.testing.assert_array_equal(loaded_pred, pred)
    np.testing.assert_allclose(loaded_conf, conf, rtol=1e-6)


def test_a_knn_search_builds_the_classifier_it_names():
    config = ScannConfig(num_leaves=4, num_leaves_to_search=2)
    classifier = KnnSearch("scann", config, min_recall=0.5).classifier(3, 2.0)
    assert (classifier.k, classifier.tau, classifier.min_recall) == (3, 2.0, 0.5)
    assert isinstance(classifier.index, ScannSearcher) and classifier.index.config == config
    assert KnnSearch("scann").approximate and not KnnSearch().approximate
    assert isinstance(KnnSearch().classifier(1, 1.0).index, ExactSearcher)
    with pytest.raises(ValueError, match="unknown search backend 'faiss'"):
        KnnSearch("faiss")
    with pytest.raises(ValueError, match="the 'exact' searcher takes no config"):
        KnnSearch("exact", config)
    with pytest.raises(TypeError, match="num_trees"):
        KnnSearch("scann", {"num_trees": 3})  # not a ScannConfig field


def test_bad_input():
    database = _unit(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="10 descriptors but 9 labels"):
        KnnClassifier().fit(database, np.arange(9))
    broken = database.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3 is NaN"):
        KnnClassifier().fit(broken, np.arange(10))
    classifier = KnnClassifier().fit(database, np.arange(10))
    with pytest.raises(ValueError, match="between 1 and the database size 10"):
        classifier.neighbors(database, 11)
    with pytest.raises(ValueError, match="dimension"):
        classifier.neighbors(database[:, :3])
    with pytest.raises(ValueError, match="backend"):
        KnnClassifier(backend="faiss")
    with pytest.raises(ValueError, match="tau"):
        knn_confidence([[0.1]], [[1]], 2, tau=-1.0)
