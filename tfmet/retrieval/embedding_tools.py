"""Tools on a classifier's pooled features: nearest paintings and outlier scores (ArtExtract).

Features are L2-normalised and compared by cosine similarity; the exact searcher
(`tfmet.retrieval.searchers.ExactSearcher`, float32 GEMMs with a running top k) finds the
neighbours. Distances are cosine distances, 1 - cos, in [0, 2].

- `NearestPaintings`: index a collection's features once, then ask for the nearest paintings of
  new images.
- `outlier_scores`: for each image, the mean cosine distance to its k nearest neighbours that
  carry the same label; paintings unlike the rest of their style rank first. `write_outlier_csv`
  writes the ranking.
"""

import csv

import numpy as np

from tfmet.io.atomic import atomic_path
from tfmet.retrieval.pca import l2_normalize_rows
from tfmet.retrieval.searchers import ExactSearcher


def normalize_rows(features):
    """float32 rows divided by their L2 norm (all-zero rows stay zero): `l2_normalize_rows`."""
    return l2_normalize_rows(np.array(features, np.float32))


def nearest(database, queries, k):
    """Exact top-`k` inner-product search -> (similarities [q, k'], indices int [q, k']),
    k' = min(k, n), with `ExactSearcher`: rows by decreasing similarity, ties to the smaller
    index, as every tfmet search; `database` and `queries` are used as given.
    """
    database = np.ascontiguousarray(database, np.float32)
    queries = np.ascontiguousarray(queries, np.float32)
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(
            "database and queries must be 2-D with the same width. Received: "
            f"database.shape={database.shape}, queries.shape={queries.shape}"
        )
    k = min(int(k), len(database))
    if k < 1 or not len(queries):
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return ExactSearcher().build(database).search(queries, k)


class NearestPaintings:
    """Nearest paintings by cosine similarity of pooled features.

    Args:
      features: [n, d] features of the collection.
      paths: n image paths (or any ids) returned with the results.
      labels: optional n label strings returned with the results.
    """

    def __init__(self, features, paths, labels=None):
        if len(features) != len(paths):
            raise ValueError(
                f"features and paths differ in length. Received: {len(features)} features, "
                f"{len(paths)} paths"
            )
        self.features = normalize_rows(features)
        self.paths = list(paths)
        self.labels = None if labels is None else list(labels)

    def query(self, features, k=5):
        """For each query row, a list of (path, label or None, cosine similarity), best first."""
        scores, indices = nearest(self.features, normalize_rows(features), k)
        results = []
        for row_indices, row_scores in zip(indices, scores, strict=True):
            results.append(
                [
                    (self.paths[i], None if self.labels is None else self.labels[i], float(s))
                    for i, s in zip(row_indices, row_scores, strict=True)
                ]
            )
        return results


def outlier_scores(features, labels, k=5):
    """Mean cosine distance of each row to its `k` nearest same-label rows (itself excluded).

    Args:
      features: [n, d].
      labels: [n] labels (ints or strings); rows with label -1 or "" get NaN.
      k: neighbours per row; a class with m members uses min(k, m - 1) (NaN for a singleton).

    Returns:
      float32 [n] scores (higher = more atypical of its label).
    """
    features = normalize_rows(features)
    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise ValueError(
            f"features and labels differ in length. Received: {len(features)} features, "
            f"{len(labels)} labels"
        )
    if int(k) < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k}")
    scores = np.full(len(features), np.nan, np.float32)
    for value in np.unique(labels):
        if (labels.dtype.kind in "iu" and value < 0) or (labels.dtype.kind in "US" and not value):
            continue
        members = np.flatnonzero(labels == value)
        if len(members) < 2:
            continue
        group = features[members]
        similarities, neighbours = nearest(group, group, min(int(k), len(members) - 1) + 1)
        for row, (indices, sims) in enumerate(zip(neighbours, similarities, strict=True)):
            keep = indices != row
            sims = sims[keep][: neighbours.shape[1] - 1]
            scores[members[row]] = float(np.mean(1.0 - sims))
    return scores


def write_outlier_csv(path, paths, labels, scores):
    """Writes `rank,path,label,score`, most atypical first; NaN scores (no neighbours) last."""
    scores = np.asarray(scores, np.float64)
    order = sorted(
        range(len(scores)), key=lambda i: (np.isnan(scores[i]), -np.nan_to_num(scores[i]), i)
    )
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "path", "label", "score"])
            for rank, i in enumerate(order, 1):
                score = "" if np.isnan(scores[i]) else f"{scores[i]:.6f}"
                writer.writerow([rank, paths[i], labels[i], score])
    return order
