"""The in-graph forms of the searchers and of the confidence rule, as TensorFlow ops.

What the one-piece recogniser SavedModel (`tfmet.export.recognizer`) runs after its descriptor:
- `ExactGraphSearch`: the "exact" searcher's in-graph form, a matmul + top-k (plain TensorFlow
  ops, servable by stock TF Serving; right for databases up to a few hundred thousand rows);
- `ScannGraphSearch`: the "scann" searcher's, ScaNN's TensorFlow searcher stored through its
  module serialisation (the serving process must load ScaNN's op library first, e.g.
  `import scann`);
- `knn_confidence_ops`: the TensorFlow implementation behind `tfmet.retrieval.knn.knn_confidence`
  (call that: it dispatches here for tensors; tests hold both implementations to equal numbers).

Built through `Searcher.in_graph(database, k)` (`tfmet.retrieval.searchers`), not directly.
"""

import uuid

import numpy as np
import tensorflow as tf

from tfmet.retrieval.scann_build import configure_builder


class ExactGraphSearch(tf.Module):
    """(similarities [B, k], database row indices [B, k]) by descending similarity: a matmul
    against the database variable and top-k."""

    def __init__(self, database, k, name=None):
        super().__init__(name=name)
        self.k = int(k)
        self.config = None
        self.database = tf.Variable(
            np.ascontiguousarray(database, np.float32), trainable=False, name="database"
        )

    def __call__(self, descriptors):
        scores = tf.matmul(descriptors, self.database, transpose_b=True)
        return tf.math.top_k(scores, k=self.k, sorted=True)


class ScannGraphSearch(tf.Module):
    """ScaNN's TF searcher over `database` built with `config` (a `ScannConfig`), or over the
    `state` (a `scann_ops.ScannState`) of an index built before (`database` is then None)."""

    def __init__(self, database, k, config, name=None, state=None):
        from scann.scann_ops.py import scann_ops

        super().__init__(name=name)
        self.k = int(k)
        self.config = config
        if state is None:
            database = np.ascontiguousarray(database, np.float32)
            builder = scann_ops.builder(database, self.k, "dot_product")
            state = configure_builder(builder, config, len(database)).build().serialize_to_module()
        self.state = state
        # The searcher is rebuilt from its serialised state once per process: the op looks the
        # shared name up in the resource manager before creating it.
        self.shared_name = f"tfmet-scann-{uuid.uuid4().hex}"

    def __call__(self, descriptors):
        from scann.scann_ops.py import scann_ops

        s = self.state
        handle = scann_ops.tensors_to_scann(
            s.dataset,
            s.scann_config,
            s.serialized_partitioner,
            s.datapoint_to_token,
            s.ah_codebook,
            s.hashed_dataset,
            s.int8_dataset,
            s.int8_multipliers,
            s.dp_norms,
            shared_name=self.shared_name,
        )
        indices, sims = scann_ops.scann_search_batched(handle, descriptors, self.k, -1, -1, False)
        return sims, indices


def knn_confidence_ops(similarities, neighbor_labels, num_classes, tau, valid=None, top_k=None):
    """`tfmet.retrieval.knn.knn_confidence` as TensorFlow ops (same arguments, same rule).

    Returns (pred [B] int64, conf [B] float32, top_labels [B, t] int64, top_probs [B, t]
    float32), t = min(k, `top_k` or k). Computed in float64 in log space, so tau up to 500 does
    not overflow.
    """
    sims = tf.cast(similarities, tf.float64)  # tau * s up to 500 keeps 1e-7 relative precision
    labels = tf.cast(neighbor_labels, tf.int64)
    k = tf.shape(labels)[1]
    zero = tf.constant(0.0, tf.float64)
    same = tf.equal(labels[:, :, None], labels[:, None, :])  # [B, k, k]
    if valid is not None:
        valid = tf.cast(valid, tf.bool)
        same = tf.logical_and(same, tf.logical_and(valid[:, :, None], valid[:, None, :]))
    floored = tf.maximum(sims, zero)
    # Score of each neighbour's label: max over the neighbours sharing it.
    score = tf.reduce_max(tf.where(same, floored[:, None, :], zero), axis=2)
    # First occurrence of each distinct label.
    earlier = tf.linalg.band_part(tf.ones([k, k], tf.bool), -1, 0)  # j <= i
    earlier = tf.logical_and(earlier, tf.logical_not(tf.eye(k, dtype=tf.bool)))  # j < i
    first = tf.logical_not(tf.reduce_any(tf.logical_and(same, earlier[None]), axis=2))
    if valid is not None:
        first = tf.logical_and(first, valid)

    logits = tf.cast(tau, tf.float64) * score
    present = tf.reduce_sum(tf.cast(first, tf.float64), axis=1)
    absent = tf.cast(num_classes, tf.float64) - present
    masked = tf.where(first, logits, -float("inf"))
    no_absent = tf.where(absent > 0, zero, -float("inf"))
    peak = tf.maximum(tf.reduce_max(masked, axis=1), no_absent)
    total = tf.reduce_sum(tf.exp(masked - peak[:, None]), axis=1) + absent * tf.exp(-peak)
    log_norm = peak + tf.math.log(total)

    # Distinct labels by score descending, ties to the smaller label: a stable sort by label,
    # then a stable sort by score. Repeated labels (and padding) get score -1 and sort last.
    by_label = tf.argsort(labels, axis=1, stable=True)
    ranked = tf.gather(
        tf.where(first, score, tf.constant(-1.0, tf.float64)), by_label, batch_dims=1
    )
    order = tf.gather(
        by_label, tf.argsort(ranked, axis=1, direction="DESCENDING", stable=True), batch_dims=1
    )
    order = order[:, : (k if top_k is None else tf.minimum(k, int(top_k)))]
    kept = tf.gather(first, order, batch_dims=1)
    top_labels = tf.where(kept, tf.gather(labels, order, batch_dims=1), tf.constant(-1, tf.int64))
    top_probs = tf.where(
        kept, tf.exp(tf.gather(logits, order, batch_dims=1) - log_norm[:, None]), 0.0
    )
    top_probs = tf.cast(top_probs, tf.float32)
    return top_labels[:, 0], top_probs[:, 0], top_labels, top_probs
