"""Spatial re-ranking of the kNN decision: `tfmet-knn-eval --rerank=spatial`.

After the global kNN has predicted an exhibit for each query, the database images of that
exhibit among the query's `top` global neighbours are verified against it
(`tfmet.retrieval.spatial.inliers`, on the local features extracted with `--local_features`);
the best inlier count folds into the confidence by `spatial.verified_confidence`, whose weight
and saturation are chosen on val GAP over `WEIGHTS` x `SATURATIONS` (weight 0, the global
decision, is in the grid: val GAP never drops). The predicted exhibit stays the global one, so
ACC is unchanged and GAP / GAP- measure what the second look adds.
"""

import dataclasses
import numbers
import time

import numpy as np

from tfmet.metrics import recognition
from tfmet.retrieval import spatial

DEFAULT_TOP = 20
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SATURATIONS = (4, 8, 12, 16, 24, 32, 48)


@dataclasses.dataclass(frozen=True)
class SpatialRerank:
    """What a kNN evaluation re-ranks by spatial verification with (`tfmet-knn-eval --rerank`).

    local: {split: `tfmet.data.descriptor_store.LocalStore`} of every split evaluated, the
      database's ("train") included (`tfmet.retrieval.evaluation.load_local_features`).
    top: global neighbours verified per query (M).
    """

    local: dict
    top: int = DEFAULT_TOP

    def __post_init__(self):
        if not isinstance(self.top, numbers.Integral) or isinstance(self.top, bool) or self.top < 1:
            raise ValueError(f"`top` must be a positive integer. Received: {self.top!r}")


@dataclasses.dataclass
class RerankResult:
    """The re-ranked decision: its parameters, metrics and costs (`to_json` for results)."""

    top: int
    threshold: float
    weight: float
    saturation: float
    metrics: dict  # split -> GAP / GAP- / ACC of the re-ranked confidences
    predictions: dict  # split -> (pred, verified confidence, labels)
    pairs: int  # query-candidate pairs verified
    seconds: float

    def to_json(self):
        return {
            "method": "spatial",
            "top": self.top,
            "residual_threshold": self.threshold,
            "weight": self.weight,
            "saturation": self.saturation,
            **self.metrics,
            "pairs_verified": self.pairs,
            "ms_per_pair": round(1e3 * self.seconds / max(self.pairs, 1), 4),
        }


def _features(local_store, row):
    points, descriptors, scores = local_store.image(row)
    return spatial.LocalFeatures(points, descriptors, scores)


def best_inliers(classifier, split, local_store, pred, database, top, threshold):
    """The best inlier count per row of a query split, over the database images of its
    predicted exhibit among its `top` neighbours (0 for invalid rows and when none is there).

    Args:
      classifier: the fitted `KnnClassifier` (its searcher gives the neighbours).
      split: the query `SplitData` (whitened like the database).
      local_store: the split's `tfmet.data.descriptor_store.LocalStore`.
      pred: [n] predictions of the global decision.
      database: (labels [m], local store, store rows [m]) of the classifier's database rows.
    """
    labels, database_local, database_rows = database
    counts = np.zeros(len(split.labels), np.int64)
    rows = np.flatnonzero(split.valid)
    if not len(rows):
        return counts, 0
    _, indices = classifier.neighbors(split.valid_descriptors(), min(top, len(labels)))
    pairs = 0
    for row, neighbours in zip(rows, indices, strict=True):
        candidates = [j for j in neighbours if j >= 0 and labels[j] == pred[row]]
        if not candidates:
            continue
        query = _features(local_store, row)
        for j in candidates:
            found = spatial.inliers(
                query, _features(database_local, database_rows[j]), threshold=threshold
            )
            counts[row] = max(counts[row], found)
        pairs += len(candidates)
    return counts, pairs


def spatial_rerank(classifier, splits, local_stores, predictions, database, top, log, threshold):
    """Verifies each query split's predictions and tunes the rule on val (see the module doc).

    Args:
      classifier: the fitted `KnnClassifier`.
      splits: {split: SplitData} of the queries ("val", and "test" when reported).
      local_stores: {split: LocalStore} for those splits.
      predictions: {split: (pred, conf, labels)} of the global decision.
      database: see `best_inliers`.
      top: global neighbours looked at per query.
      log: callable taking a line.
      threshold: RANSAC residual (`spatial.DEFAULT_THRESHOLD`).
    """
    start = time.perf_counter()
    inliers, pairs = {}, 0
    for name in predictions:
        inliers[name], n = best_inliers(
            classifier, splits[name], local_stores[name], predictions[name][0], database, top,
            threshold,
        )  # fmt: skip
        pairs += n
    seconds = time.perf_counter() - start
    pred, conf, labels = predictions["val"]

    def val_gap(choice):
        return recognition.gap(
            pred, spatial.verified_confidence(conf, inliers["val"], *choice), labels
        )

    weight, saturation = max(((w, s) for w in WEIGHTS for s in SATURATIONS), key=val_gap)
    verified, metrics = {}, {}
    for name, (pred, conf, labels) in predictions.items():
        confidence = spatial.verified_confidence(conf, inliers[name], weight, saturation)
        verified[name] = (pred, confidence, labels)
        metrics[name] = recognition.evaluate(pred, confidence, labels)
        log(
            f"{name} re-ranked (spatial, top {top}): GAP {metrics[name]['gap']:.6f}, "
            f"GAP- {metrics[name]['gap_minus']:.6f}, ACC {metrics[name]['acc']:.6f}"
        )
    log(
        f"spatial verification: weight {weight}, saturation {saturation} (chosen on val GAP); "
        f"{pairs} pairs in {seconds:.2f} s ({1e3 * seconds / max(pairs, 1):.2f} ms per pair)"
    )
    return RerankResult(top, threshold, weight, saturation, metrics, verified, pairs, seconds)
