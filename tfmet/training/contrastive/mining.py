"""Pair mining for contrastive training on the Met database (re-done every epoch).

Each database image is the anchor of one positive pair and, except for `sim_siam_pos`, of one
negative pair. The four pair types of the Met reference:

=======================  =====================================================================
`sim_siam_pos`           positive = the anchor itself (a synthetic pair: two augmentations)
`sim_siam_pos+new_neg`   the same positive + a mined hard negative ("Con-Syn")
`pos+new_neg`            positive = a uniformly random image of the anchor's class, the anchor
                         itself included + a hard negative ("Con-Syn+Real")
`new_pos+new_neg`        positive = a random one of the 2 images of the anchor's class most
                         similar to it (itself normally first) + a hard negative
                         ("Con-Syn+Real-closest")
=======================  =====================================================================

Rules (docs/contrastive.md):

- hard negative: among the anchor's `top_k` (25) nearest neighbours by inner product, the first
  `pool` (10) whose class differs; one of them uniformly at random. When the top 25 hold fewer
  than 10 such images the pick is among those found; when they hold none (a class with 25+ near
  duplicates) the nearest different-class image of the whole database is used (the reference
  crashes on both: it reads past its 25 results).
- singleton classes always pair with themselves (an augmented self).
- similarity ties are broken by database order (the lower row first), so results do not depend
  on a sort's stability.

All randomness comes from the `numpy.random.Generator` passed in; the same generator state gives
the same pairs. Rows marked invalid (unreadable images) are neither anchors nor partners.
"""

import dataclasses

import numpy as np

from tfmet.retrieval.searchers import make_searcher

PAIR_TYPES = ("sim_siam_pos", "sim_siam_pos+new_neg", "pos+new_neg", "new_pos+new_neg")

# Pair kinds, for statistics.
SYNTHETIC = 0  # an image with itself (two augmentations)
REAL_POSITIVE = 1  # two different images of the same class
NEGATIVE = 2  # images of different classes

TOP_K = 25
NEGATIVE_POOL = 10
CLOSEST_POSITIVES = 2


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Pairs of database rows.

    Attributes:
      first, second: int64 [n] row indices of the two images.
      label: int32 [n], 1 for positive pairs, 0 for negative pairs.
      kind: int8 [n], SYNTHETIC, REAL_POSITIVE or NEGATIVE.
    """

    first: np.ndarray
    second: np.ndarray
    label: np.ndarray
    kind: np.ndarray

    def __len__(self):
        return int(self.first.shape[0])

    def take(self, order):
        """The pairs reordered (or subset) by the index array `order`."""
        return Pairs(self.first[order], self.second[order], self.label[order], self.kind[order])

    def shuffled(self, rng):
        """The pairs in a random order drawn from `rng` (the reference's shuffling loader)."""
        return self.take(rng.permutation(len(self)))

    def statistics(self):
        """Counts of each kind, for logging."""
        return {
            "pairs": len(self),
            "synthetic_positives": int(np.sum(self.kind == SYNTHETIC)),
            "real_positives": int(np.sum(self.kind == REAL_POSITIVE)),
            "negatives": int(np.sum(self.kind == NEGATIVE)),
        }


def check_pair_type(pair_type):
    if pair_type not in PAIR_TYPES:
        raise ValueError(f"`pair_type` must be one of {PAIR_TYPES}. Received: {pair_type!r}")
    return pair_type


def needs_descriptors(pair_type):
    """Whether `pair_type` mines with descriptors (all but `sim_siam_pos`)."""
    return check_pair_type(pair_type) != "sim_siam_pos"


def _check_labels_valid(labels, valid):
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if valid.shape != labels.shape:
        raise ValueError(
            f"`valid` must have one entry per label ({labels.size}). Received: {valid.size}"
        )
    return labels, valid


def _check_descriptors(descriptors, count):
    descriptors = np.asarray(descriptors, np.float32)
    if descriptors.ndim != 2 or descriptors.shape[0] != count:
        raise ValueError(
            f"`descriptors` must have shape [{count}, dim] (one row per label). "
            f"Received: shape={descriptors.shape}"
        )
    if not np.all(np.isfinite(descriptors)):
        raise ValueError("`descriptors` contain NaN or infinite values")
    return descriptors


def class_members(labels):
    """(sorted row indices grouped by class, start of each row's class group, class sizes).

    Returns `order`, `start` [n], `size` [n]: the rows of row i's class are
    order[start[i] : start[i] + size[i]], in increasing row order.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, first, inverse, counts = np.unique(
        labels[order], return_index=True, return_inverse=True, return_counts=True
    )
    start = np.empty(labels.shape[0], np.int64)
    size = np.empty(labels.shape[0], np.int64)
    start[order] = first[inverse]
    size[order] = counts[inverse]
    return order, start, size


def synthetic_positives(labels, valid=None):
    """Each valid row paired with itself."""
    labels, valid = _check_labels_valid(labels, valid)
    return np.flatnonzero(valid), np.flatnonzero(valid)


def random_positives(labels, rng, valid=None):
    """Each valid row with a uniformly random valid row of its class (possibly itself).

    Returns (anchors, partners), int64 arrays.
    """
    labels, valid = _check_labels_valid(labels, valid)
    rows = np.flatnonzero(valid)
    order, start, size = class_members(labels[rows])
    offset = np.floor(rng.random(rows.size) * size).astype(np.int64)
    partners = order[start + np.minimum(offset, size - 1)]
    return rows, rows[partners]


def closest_positives(descriptors, labels, rng, valid=None, top=CLOSEST_POSITIVES):
    """Each valid row with a random one of the `top` rows of its class most similar to it.

    Similarity is the inner product; the row itself competes (and normally wins), so the pick is
    a synthetic pair or the closest real positive. Ties go to the lower row. Singletons pair
    with themselves.

    Returns (anchors, partners), int64 arrays.
    """
    labels, valid = _check_labels_valid(labels, valid)
    descriptors = _check_descriptors(descriptors, labels.size)
    if top < 1:
        raise ValueError(f"`top` must be at least 1. Received: top={top}")
    rows = np.flatnonzero(valid)
    sub_labels = labels[rows]
    sub_desc = descriptors[rows]
    order, start, size = class_members(sub_labels)
    partners = np.empty(rows.size, np.int64)
    draws = rng.random(rows.size)
    # Classes of equal size are handled together: [classes, m, d] -> Gram [classes, m, m].
    group_starts = np.unique(start)
    group_sizes = size[order[group_starts]]
    for m in np.unique(group_sizes):
        members = order[group_starts[group_sizes == m][:, None] + np.arange(m)[None, :]]
        if m == 1:
            partners[members[:, 0]] = members[:, 0]
            continue
        block = sub_desc[members]  # [classes, m, d]
        sims = np.einsum("cid,cjd->cij", block, block)
        # Descending similarity, ties by lower row (members are in increasing row order).
        ranked = np.argsort(-sims, axis=-1, kind="stable")[..., : min(top, m)]
        anchors = members.reshape(-1)
        candidates = np.take_along_axis(
            np.broadcast_to(members[:, None, :], sims.shape), ranked, axis=-1
        ).reshape(anchors.size, -1)
        choice = np.floor(draws[anchors] * candidates.shape[1]).astype(np.int64)
        partners[anchors] = candidates[np.arange(anchors.size), choice]
    return rows, rows[partners]


def exact_search(database, queries, k, chunk_rows=1024):
    """Exact inner-product top-k in numpy: (similarities [q, k], indices [q, k]).

    Ties go to the lower index. Queries are processed `chunk_rows` at a time.
    """
    database = np.asarray(database, np.float32)
    queries = np.asarray(queries, np.float32)
    k = min(int(k), database.shape[0])
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk_rows):
        block = queries[start : start + chunk_rows] @ database.T
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        sims.append(np.take_along_axis(block, order, axis=1))
        idx.append(order)
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(idx)


def knn_search(database, queries, k, backend="scann"):
    """Top-k inner-product neighbours with the searcher registered as `backend`
    (`tfmet.retrieval.searchers`): "scann" is ScaNN's tree + asymmetric hashing + exact
    reordering for large databases (brute force below its size threshold), "exact" the
    float32 GEMM search with a running top k.
    """
    searcher = make_searcher(backend).build(np.asarray(database, np.float32))
    return searcher.search(np.asarray(queries, np.float32), min(int(k), searcher.size))


def hard_negatives(
    descriptors,
    labels,
    rng,
    valid=None,
    top_k=TOP_K,
    pool=NEGATIVE_POOL,
    search=knn_search,
):
    """Each valid row with a random one of its `pool` nearest different-class rows.

    Args:
      descriptors: float32 [n, d], L2-normalised descriptors from the previous epoch.
      labels: [n] class labels.
      rng: numpy Generator.
      valid: optional bool [n]; invalid rows are ignored.
      top_k: neighbours searched (25); candidates are the different-class ones among them.
      pool: how many of the nearest candidates the pick is drawn from (10).
      search: `search(database, queries, k) -> (similarities, indices)`, -1 padding allowed;
        `knn_search` (ScaNN) by default, `exact_search` for numpy brute force.

    Returns:
      (anchors, negatives), int64 arrays.

    Raises:
      ValueError: there is a single class, so no negative exists.
    """
    labels, valid = _check_labels_valid(labels, valid)
    descriptors = _check_descriptors(descriptors, labels.size)
    if pool < 1 or top_k < 1:
        raise ValueError(f"`pool` and `top_k` must be positive. Received: {pool}, {top_k}")
    rows = np.flatnonzero(valid)
    sub_labels = labels[rows]
    if np.unique(sub_labels).size < 2:
        raise ValueError("hard negatives need at least two classes among the valid images")
    sub_desc = descriptors[rows]
    _, neighbors = search(sub_desc, sub_desc, min(top_k, rows.size))
    neighbors = np.asarray(neighbors, np.int64)
    different = (neighbors >= 0) & (sub_labels[np.maximum(neighbors, 0)] != sub_labels[:, None])
    # Rank of each different-class neighbour among the different-class ones (0, 1, ...).
    rank = np.cumsum(different, axis=1) - 1
    in_pool = different & (rank < pool)
    count = in_pool.sum(axis=1)
    choice = np.floor(rng.random(rows.size) * np.maximum(count, 1)).astype(np.int64)
    negatives = np.full(rows.size, -1, np.int64)
    found = count > 0
    hit = in_pool & (rank == choice[:, None])
    negatives[found] = neighbors[found][hit[found]]
    for i in np.flatnonzero(~found):
        sims = sub_desc @ sub_desc[i]
        sims[sub_labels == sub_labels[i]] = -np.inf
        negatives[i] = int(np.argmax(sims))  # first maximum: lower row on ties
    return rows, rows[negatives]


def make_pairs(
    pair_type,
    labels,
    rng,
    descriptors=None,
    valid=None,
    top_k=TOP_K,
    pool=NEGATIVE_POOL,
    search=knn_search,
):
    """The epoch's pairs of `pair_type`, positives first then negatives (not shuffled).

    Args:
      pair_type: one of PAIR_TYPES.
      labels: [n] class labels of the database rows.
      rng: numpy Generator (positives are drawn before negatives).
      descriptors: [n, d] descriptors of the previous epoch; required unless `sim_siam_pos`.
      valid: optional bool [n] mask of usable rows.
      top_k, pool, search: see `hard_negatives`.

    Returns:
      `Pairs`.
    """
    check_pair_type(pair_type)
    labels, valid = _check_labels_valid(labels, valid)
    if needs_descriptors(pair_type) and descriptors is None:
        raise ValueError(f"pair type {pair_type!r} mines with descriptors; none were given")
    if pair_type.startswith("sim_siam_pos"):
        anchors, partners = synthetic_positives(labels, valid)
    elif pair_type.startswith("pos"):
        anchors, partners = random_positives(labels, rng, valid)
    else:
        anchors, partners = closest_positives(descriptors, labels, rng, valid)
    kinds = [np.where(anchors == partners, SYNTHETIC, REAL_POSITIVE)]
    firsts, seconds, pair_labels = [anchors], [partners], [np.ones(anchors.size, np.int32)]
    if pair_type.endswith("new_neg"):
        anchors, negatives = hard_negatives(descriptors, labels, rng, valid, top_k, pool, search)
        firsts.append(anchors)
        seconds.append(negatives)
        pair_labels.append(np.zeros(anchors.size, np.int32))
        kinds.append(np.full(anchors.size, NEGATIVE))
    return Pairs(
        first=np.concatenate(firsts).astype(np.int64),
        second=np.concatenate(seconds).astype(np.int64),
        label=np.concatenate(pair_labels).astype(np.int32),
        kind=np.concatenate(kinds).astype(np.int8),
    )
