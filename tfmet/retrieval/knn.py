"""The Met kNN classifier: the reference's confidence rule over a ScaNN neighbour search.

For a query with neighbours (similarity s_j, database label l_j), j < K:
- each distinct label among them scores the maximum similarity of its neighbours, floored at 0
  (the reference accumulates the maximum from 0);
- every other database class scores 0;
- p = softmax(tau * score) over all N distinct database labels (tau multiplies: an inverse
  temperature), so each of the N - P absent classes contributes exp(0);
- pred = the label with the highest score, ties to the smallest label; conf = p_pred.

Only labels present among the neighbours are predicted (as in the reference); when their best
score is 0 they tie with the absent classes and the confidence is 1 / N. The softmax is computed
with the maximum factored out, in float64, so tau = 500 cannot overflow:
conf = 1 / (sum_present exp(tau (s - s_max)) + (N - P) exp(-tau s_max)).
"""

import dataclasses
import logging
import os
import sys

import numpy as np

from tfmet.io.arrays import load_npy
from tfmet.io.atomic import save_json, save_npy
from tfmet.io.json_files import read_manifest
from tfmet.retrieval import recall
from tfmet.retrieval.pca import row_chunks
from tfmet.retrieval.searchers import load_searcher, make_searcher, searcher_class

FORMAT = "tfmet-knn-classifier"
CHECK_ROWS = 65536
DEFAULT_MIN_RECALL = recall.DEFAULT_MIN_RECALL


@dataclasses.dataclass(frozen=True)
class KnnSearch:
    """The neighbour search of a kNN evaluation (`KnnClassifier`'s search arguments).

    backend: a searcher name of `tfmet.retrieval.searchers.SEARCHERS` ("exact", "scann"); an
      unknown one is a ValueError listing them.
    config: the searcher's config (a `ScannConfig` or dict for "scann"; None sizes it from the
      database), None for "exact" (a config for a backend that takes none is a ValueError).
    min_recall: for an approximate searcher, the recall@k against exact search to reach on the
      val queries (`tfmet.retrieval.recall`).
    """

    backend: str = "exact"
    config: object = None
    min_recall: float = DEFAULT_MIN_RECALL

    def __post_init__(self):
        searcher_class(self.backend).parse_config(self.config)

    @property
    def approximate(self):
        return searcher_class(self.backend).approximate

    def classifier(self, k, tau):
        """A `KnnClassifier` searching so."""
        return KnnClassifier(k, tau, self.backend, self.config, min_recall=self.min_recall)


def knn_confidence(similarities, neighbor_labels, num_classes, tau, valid=None, top_k=None):
    """Applies the confidence rule (the module docstring) to each row of neighbours.

    The one definition of the rule: numpy arrays are scored here in float64; tensors (inside
    a tf.function, e.g. the recogniser SavedModel) by the same rule in TensorFlow ops,
    `tfmet.retrieval.graph_search.knn_confidence_ops` (conf float32), held equal to this by
    tests/retrieval/test_searchers.py.

    Args:
      similarities: float [q, K] neighbour similarities (any order).
      neighbor_labels: int [q, K] their database labels.
      num_classes: N, the number of distinct database labels.
      tau: the softmax's inverse temperature (>= 0).
      valid: optional bool [q, K]; False marks padding (not a neighbour).
      top_k: also return the distinct neighbour labels by descending probability (ties to the
        smaller label), at most `top_k` of them, padded with label -1 / probability 0.

    Returns:
      (pred int64 [q], conf [q]); with `top_k`, (pred, conf, top_labels [q, t], top_probs
      [q, t]), t = min(K, top_k). A row without any neighbour gets pred -1, conf 0.
    """
    if _is_tensor(similarities) or _is_tensor(neighbor_labels):
        from tfmet.retrieval.graph_search import knn_confidence_ops

        out = knn_confidence_ops(similarities, neighbor_labels, num_classes, tau, valid, top_k)
        return out if top_k is not None else out[:2]
    similarities = np.asarray(similarities, np.float64)
    labels = np.asarray(neighbor_labels, np.int64)
    if similarities.ndim != 2 or similarities.shape != labels.shape:
        raise ValueError(
            "`similarities` and `neighbor_labels` must be 2-D arrays of the same shape. Received: "
            f"{similarities.shape} and {labels.shape}"
        )
    valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
    if not np.isfinite(tau) or tau < 0:
        raise ValueError(f"`tau` must be a finite number >= 0. Received: tau={tau}")
    width = labels.shape[1] if top_k is None else min(labels.shape[1], int(top_k))
    if labels.shape[0] == 0:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
        tops = (np.zeros((0, width), np.int64), np.zeros((0, width), np.float64))
        return empty if top_k is None else empty + tops
    # Group the neighbours by label (ascending), best similarity first within a label.
    order = np.lexsort((-similarities, np.where(valid, labels, np.iinfo(np.int64).max)), axis=1)
    labels = np.take_along_axis(labels, order, 1)
    similarities = np.take_along_axis(similarities, order, 1)
    valid = np.take_along_axis(valid, order, 1)
    first = valid.copy()
    first[:, 1:] &= labels[:, 1:] != labels[:, :-1]
    present = first.sum(axis=1)
    if np.any(present > num_classes):
        raise ValueError(
            f"`num_classes`={num_classes} is smaller than the number of distinct neighbour labels "
            f"({int(present.max())})"
        )
    score = np.where(first, np.maximum(similarities, 0.0), -np.inf)
    best = score.max(axis=1)
    winner = np.argmax(score == best[:, None], axis=1)  # first = smallest label among the best
    pred = labels[np.arange(labels.shape[0]), winner]
    found = present > 0
    best = np.where(found, best, 0.0)
    below_best = np.where(first, score - best[:, None], 0.0)
    shifted = np.where(first, np.exp(tau * below_best), 0.0)
    denominator = shifted.sum(axis=1) + (num_classes - present) * np.exp(-tau * best)
    conf = np.where(found, 1.0 / denominator, 0.0)
    pred = np.where(found, pred, -1)
    if top_k is None:
        return pred, conf
    # Labels are ascending along each row: a stable sort by descending score ties to the smaller.
    ranking = np.argsort(-score, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(first, ranking, 1)
    top_labels = np.where(kept, np.take_along_axis(labels, ranking, 1), -1)
    probabilities = np.where(first, shifted / denominator[:, None], 0.0)
    top_probs = np.where(kept, np.take_along_axis(probabilities, ranking, 1), 0.0)
    return pred, conf, top_labels, top_probs


def _is_tensor(x):
    # TensorFlow is only looked at when something loaded it: numpy callers never import it.
    tf = sys.modules.get("tensorflow")
    return tf is not None and tf.is_tensor(x)


def check_finite(name, x):
    """Raises ValueError naming the first row of `x` holding NaN or inf."""
    for rows, chunk in row_chunks(x, CHECK_ROWS):
        bad = ~np.all(np.isfinite(chunk), axis=1)
        if np.any(bad):
            raise ValueError(f"{name}: row {rows.start + int(np.argmax(bad))} is NaN or infinite")


class KnnClassifier:
    """kNN classification of descriptors with the reference's confidence rule.

    Args:
      k: neighbours per query.
      tau: softmax inverse temperature.
      backend: a searcher name of `tfmet.retrieval.searchers.SEARCHERS`: "exact" (ScaNN brute
        force) or "scann" (tree + AH + reorder).
      scann_config: the searcher's config: a `ScannConfig` (or dict) for "scann" (None sizes it
        from the database); None for "exact".
      num_threads: ScaNN search threads (0: ScaNN's default).
      min_recall: for an approximate searcher, the recall@k against exact search that `fit`
        must reach on its `recall_queries` (see `tfmet.retrieval.recall`).

    After `fit`, `search_choice` is the `recall.SearchChoice` (None for "exact", or for "scann"
    fitted without `recall_queries`, which logs a warning that recall was not measured), and
    `index` the `Searcher` in use (an exact one where calibration fell back to exact search).
    """

    def __init__(
        self,
        k=1,
        tau=1.0,
        backend="exact",
        scann_config=None,
        num_threads=0,
        min_recall=DEFAULT_MIN_RECALL,
    ):
        if int(k) < 1:
            raise ValueError(f"`k` must be a positive integer. Received: k={k}")
        self.k = int(k)
        self.tau = float(tau)
        self.backend = backend
        self.scann_config = scann_config
        self.num_threads = int(num_threads)
        self.min_recall = float(min_recall)
        self.search_choice = None
        self.index = make_searcher(backend, scann_config, num_threads=num_threads)
        self.labels = None
        self.num_classes = 0

    def fit(
        self, descriptors, labels, recall_queries=None, recall_k=None, log=None, total_queries=None
    ):
        """Indexes database `descriptors` [n, d] (float32, L2-normalised) with int `labels` [n].

        For an approximate searcher ("scann"), `recall_queries` [q, d] (e.g. the val queries)
        measure recall@`recall_k` (default `k`) against exact search: with no explicit
        `scann_config` the cheapest configuration reaching `min_recall` is chosen, or exact
        search when none is faster (with `total_queries`, the number of queries the classifier
        will search, also when calibration and the build would cost more than the search saves);
        `log` (a callable taking a line) gets the calibration's lines.
        """
        descriptors = np.asarray(descriptors) if not hasattr(descriptors, "shape") else descriptors
        labels = np.asarray(labels)
        if descriptors.ndim != 2:
            raise ValueError(f"`descriptors` must be 2-D [n, d]. Received: {descriptors.shape}")
        if labels.shape != (descriptors.shape[0],):
            raise ValueError(
                f"{descriptors.shape[0]} descriptors but {labels.size} labels: counts must match"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"`labels` must be integers. Received dtype {labels.dtype}")
        check_finite("descriptors", descriptors)
        self._build_index(descriptors, recall_queries, recall_k, log, total_queries)
        self.labels = labels.astype(np.int64)
        self.num_classes = int(np.unique(self.labels).size)
        return self

    def _build_index(self, descriptors, recall_queries, recall_k, log, total_queries=None):
        if recall_queries is None:
            if self.index.approximate:
                logging.warning(
                    f"{self.index.backend}: recall against exact search not measured (no "
                    "recall_queries given to fit); approximate answers may be worse than exact ones"
                )
            self.index.build(descriptors)
            return
        self.search_choice, self.index = self.index.build_calibrated(
            descriptors,
            recall_queries,
            self.k if recall_k is None else recall_k,
            min_recall=self.min_recall,
            log=log,
            total_queries=total_queries,
        )
        self.scann_config = self.index.config

    def _check_fitted(self):
        if self.labels is None:
            raise ValueError("KnnClassifier is not fitted: call fit(descriptors, labels) first")

    def neighbors(self, queries, k=None):
        """(similarities float32 [q, k], database indices int64 [q, k]), best first; -1 pads."""
        self._check_fitted()
        queries = np.asarray(queries)
        if queries.ndim == 2:
            check_finite("queries", queries)
        return self.index.search(queries, self.k if k is None else k)

    def predict_from_neighbors(self, similarities, indices, k=None, tau=None):
        """(pred, conf) from the first `k` columns of a `neighbors` result (default: self.k)."""
        self._check_fitted()
        k = self.k if k is None else int(k)
        if k > np.shape(indices)[1]:
            raise ValueError(f"k={k} but only {np.shape(indices)[1]} neighbours were searched")
        indices = np.asarray(indices)[:, :k]
        valid = indices >= 0
        labels = self.labels[np.where(valid, indices, 0)]
        return knn_confidence(
            np.asarray(similarities)[:, :k],
            labels,
            self.num_classes,
            self.tau if tau is None else float(tau),
            valid,
        )

    def predict(self, queries):
        """(pred int64 [q], conf float64 [q]) for query descriptors [q, d]."""
        return self.predict_from_neighbors(*self.neighbors(queries))

    def save(self, directory):
        """Writes the index, the labels and k / tau under `directory`."""
        self._check_fitted()
        directory = os.fspath(directory)
        self.index.save(os.path.join(directory, "index"))
        save_npy(os.path.join(directory, "labels.npy"), self.labels)
        save_json(
            os.path.join(directory, "classifier.json"),
            {"format": FORMAT, "k": self.k, "tau": self.tau, "backend": self.index.backend},
        )

    @classmethod
    def load(cls, directory, num_threads=0):
        directory = os.fspath(directory)
        path = os.path.join(directory, "classifier.json")
        meta = read_manifest(path, FORMAT, "tfmet KnnClassifier file")
        classifier = cls(meta["k"], meta["tau"], meta["backend"], num_threads=num_threads)
        classifier.index = load_searcher(os.path.join(directory, "index"), num_threads)
        classifier.scann_config = classifier.index.config
        labels = load_npy(os.path.join(directory, "labels.npy"), "label array")
        if labels.shape != (classifier.index.size,):
            raise ValueError(f"{directory}: {labels.size} labels for {classifier.index.size} rows")
        classifier.labels = labels.astype(np.int64)
        classifier.num_classes = int(np.unique(classifier.labels).size)
        return classifier
