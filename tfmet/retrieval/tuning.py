"""Choosing k and tau on the validation queries by GAP, with one neighbour search.

The grid and its order are the reference's: K outer, tau inner; a later point wins only when its
val GAP is strictly higher, so ties go to the first point in that order. Unlike the reference,
which refits and searches at every grid point, the search runs once with max(ks) and every
(k, tau) point reuses its first k neighbours (the top k of a top-max(ks) list is the top k).
"""

import dataclasses

import numpy as np

from tfmet.metrics import recognition
from tfmet.retrieval.knn import DEFAULT_MIN_RECALL, KnnClassifier

DEFAULT_KS = (1, 2, 3, 5, 7, 10, 15, 20, 50)
DEFAULT_TAUS = (0.01, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 500.0)


@dataclasses.dataclass
class TuningResult:
    """The best point and the whole grid; unpacks as `k, tau, gap = result`.

    Attributes:
      k, tau: the chosen point.
      gap: its val GAP.
      grid: float64 [len(ks), len(taus)] val GAP of every point.
      ks, taus: the grid's axes, in search order.
    """

    k: int
    tau: float
    gap: float
    grid: np.ndarray
    ks: tuple
    taus: tuple

    def __iter__(self):
        return iter((self.k, self.tau, self.gap))


def check_grid(ks, taus, database_size=None):
    """Validated (ks, taus) tuples; ValueError names the bad value."""
    ks = tuple(int(k) for k in ks)
    taus = tuple(float(t) for t in taus)
    if not ks or not taus:
        raise ValueError(f"the grid needs at least one k and one tau. Received: {ks}, {taus}")
    if min(ks) < 1 or (database_size is not None and max(ks) > database_size):
        raise ValueError(f"every k must be between 1 and the database size. Received: ks={ks}")
    if not all(np.isfinite(t) and t >= 0 for t in taus):
        raise ValueError(f"every tau must be finite and >= 0. Received: taus={taus}")
    return ks, taus


def tune_on_neighbors(classifier, similarities, indices, labels, ks=DEFAULT_KS, taus=DEFAULT_TAUS):
    """Grid search over (k, tau) reusing a `classifier.neighbors(val, max(ks))` result.

    `classifier` needs `predict_from_neighbors(similarities, indices, k, tau) -> (pred, conf)`
    giving one prediction per entry of `labels`.
    """
    ks, taus = check_grid(ks, taus)
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("cannot tune on an empty validation set")
    grid = np.zeros((len(ks), len(taus)))
    best = None
    for i, k in enumerate(ks):
        for j, tau in enumerate(taus):
            pred, conf = classifier.predict_from_neighbors(similarities, indices, k, tau)
            grid[i, j] = recognition.gap(pred, conf, labels)
            if best is None or grid[i, j] > grid[best]:
                best = (i, j)
    return TuningResult(ks[best[0]], taus[best[1]], float(grid[best]), grid, ks, taus)


def tune(
    train,
    train_labels,
    val,
    val_labels,
    ks=DEFAULT_KS,
    taus=DEFAULT_TAUS,
    backend="exact",
    scann_config=None,
    min_recall=DEFAULT_MIN_RECALL,
):
    """Best (k, tau, val GAP) of a kNN classifier fitted on `train`, scored on `val`.

    Args:
      train, train_labels: database descriptors [n, d] and labels [n].
      val, val_labels: query descriptors [q, d] and labels [q] (-1 for distractors).
      ks, taus: the grid (the reference's by default), searched K outer, tau inner.
      backend, scann_config, min_recall: as for `KnnClassifier`; "scann" measures its recall
        at max(ks) on `val` against exact search (and may fall back to exact search).

    Returns:
      a `TuningResult` (unpacks as k, tau, gap).
    """
    ks, taus = check_grid(ks, taus, np.shape(train)[0])
    if np.shape(val)[0] == 0:
        raise ValueError("cannot tune on an empty validation set")
    classifier = KnnClassifier(backend=backend, scann_config=scann_config, min_recall=min_recall)
    classifier.fit(train, train_labels, recall_queries=val, recall_k=max(ks))
    similarities, indices = classifier.neighbors(val, max(ks))
    return tune_on_neighbors(classifier, similarities, indices, val_labels, ks, taus)
