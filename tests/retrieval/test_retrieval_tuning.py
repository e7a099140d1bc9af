"""Tuning: K outer / tau inner, first strictly-best point, one search, grid = independent GAPs."""

import numpy as np
import pytest

from tests.kit.references import brute_force as _brute_force
from tests.kit.references import clustered as _clustered
from tests.kit.references import rule_by_loop as _rule_by_loop
from tests.kit.references import unit as _unit
from tfmet import metrics
from tfmet.retrieval import DEFAULT_KS, DEFAULT_TAUS, ExactSearcher, tune, tune_on_neighbors


class _TableClassifier:
    """Predicts the first `table[k][tau]` of four queries right (most confident first)."""

    labels = np.array([1, 2, 3, 4])

    def __init__(self, table):
        self.table = table

    def predict_from_neighbors(self, similarities, indices, k, tau):
        right = self.table[k][tau]
        pred = np.where(np.arange(4) < right, self.labels, 0)
        return pred, np.array([0.4, 0.3, 0.2, 0.1])


def test_first_strictly_best_in_k_outer_tau_inner_order():
    # GAP = right / 4:  k=1: .25 .75 | k=2: .75 .50 | k=3: .75 .75
    table = {1: {0.1: 1, 1.0: 3}, 2: {0.1: 3, 1.0: 2}, 3: {0.1: 3, 1.0: 3}}
    result = tune_on_neighbors(
        _TableClassifier(table),
        None,
        np.zeros((4, 3)),
        _TableClassifier.labels,
        (1, 2, 3),
        (0.1, 1.0),
    )
    # Tau-outer order would pick (2, 0.1); a non-strict comparison would pick (3, 1.0).
    assert (result.k, result.tau, result.gap) == (1, 1.0, 0.75)
    k, tau, gap = result
    assert (k, tau, gap) == (1, 1.0, 0.75)
    np.testing.assert_allclose(result.grid, [[0.25, 0.75], [0.75, 0.5], [0.75, 0.75]])


def test_default_grid_is_the_reference_grid():
    assert DEFAULT_KS == (1, 2, 3, 5, 7, 10, 15, 20, 50)
    assert DEFAULT_TAUS == (0.01, 0.1, 1, 5, 10, 15, 20, 25, 30, 50, 100, 500)


def test_tune_matches_an_independent_grid_and_searches_once(monkeypatch):
    database, owner, centres = _clustered(7, 1500, 16, 60, 0.9)
    labels = 500 + owner
    rng = np.random.default_rng(8)
    count = 80
    val = _unit(centres[rng.integers(0, 60, count)] + 0.9 * rng.normal(size=(count, 16)))
    val_labels = np.where(rng.random(count) < 0.5, 500 + rng.integers(0, 60, count), -1)
    val_labels[: count // 2] = -1
    ks, taus = (1, 3, 10), (0.1, 5.0, 50.0, 500.0)

    searches = []
    original = ExactSearcher.search
    monkeypatch.setattr(
        ExactSearcher, "search", lambda self, q, k: searches.append(k) or original(self, q, k)
    )
    result = tune(database, labels, val, val_labels, ks, taus)
    assert searches == [10]

    sims, idx, _ = _brute_force(database, val, 10)
    expected = np.zeros((3, 4))
    for i, k in enumerate(ks):
        for j, tau in enumerate(taus):
            pred, conf = _rule_by_loop(sims[:, :k], labels[idx[:, :k]], 60, tau)
            expected[i, j] = metrics.gap(pred, conf, val_labels)
    np.testing.assert_allclose(result.grid, expected, rtol=1e-9)
    best = np.unravel_index(np.argmax(expected), expected.shape)  # first maximum, row-major
    assert (result.k, result.tau) == (ks[best[0]], taus[best[1]])
    assert result.gap == pytest.approx(expected.max())


def test_bad_input():
    database = _unit(np.random.default_rng(0).normal(size=(5, 4)))
    with pytest.raises(ValueError, match="empty validation set"):
        tune(database, np.arange(5), database[:0], np.zeros(0, int), ks=(1, 2))
    with pytest.raises(ValueError, match="between 1 and the database size"):
        tune(database, np.arange(5), database, np.arange(5), ks=(1, 6))
    with pytest.raises(ValueError, match="tau"):
        tune(database, np.arange(5), database, np.arange(5), ks=(1,), taus=(-1.0,))
