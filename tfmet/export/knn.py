"""The kNN confidence rule of the Met reference as TensorFlow ops, for serving graphs.

For each query with neighbour similarities `sims` [B, k] and labels `labels` [B, k]:
per distinct neighbour label the max similarity, floored at 0; every other database class counts
as similarity 0; confidence = softmax(tau * s) over all `num_classes` database classes. The
prediction is the neighbour label with the highest score, ties to the smallest label (the
reference takes argmax over the sorted distinct neighbour labels). Computed in log space, so tau up
to 500 does not overflow.
"""

import tensorflow as tf


def knn_confidence(sims, labels, tau, num_classes, top_k=None):
    """Returns (pred [B] int64, conf [B] float32, top_labels [B, t], top_probs [B, t]).

    `top_labels`/`top_probs` list the distinct neighbour labels by descending probability
    (ties to the smaller label), padded with -1 / 0; t = `top_k` or k.
    """
    sims = tf.cast(sims, tf.float64)  # float64: tau * s up to 500 keeps 1e-7 relative precision
    labels = tf.cast(labels, tf.int64)
    k = tf.shape(labels)[1]
    same = tf.equal(labels[:, :, None], labels[:, None, :])  # [B, k, k]
    floored = tf.maximum(sims, tf.constant(0.0, tf.float64))
    # Score of each neighbour's label: max over the neighbours sharing it.
    score = tf.reduce_max(tf.where(same, floored[:, None, :], tf.constant(0.0, tf.float64)), axis=2)
    # First occurrence of each distinct label.
    earlier = tf.linalg.band_part(tf.ones([k, k], tf.bool), -1, 0)  # j <= i
    earlier = tf.logical_and(earlier, tf.logical_not(tf.eye(k, dtype=tf.bool)))  # j < i
    first = tf.logical_not(tf.reduce_any(tf.logical_and(same, earlier[None]), axis=2))

    logits = tf.cast(tau, tf.float64) * score
    present = tf.reduce_sum(tf.cast(first, tf.float64), axis=1)
    absent = tf.cast(num_classes, tf.float64) - present
    masked = tf.where(first, logits, -float("inf"))
    no_absent = tf.where(absent > 0, tf.constant(0.0, tf.float64), -float("inf"))
    peak = tf.maximum(tf.reduce_max(masked, axis=1), no_absent)
    total = tf.reduce_sum(tf.exp(masked - peak[:, None]), axis=1) + absent * tf.exp(-peak)
    log_norm = peak + tf.math.log(total)

    # Distinct labels by score descending, ties to the smaller label: a stable sort by label,
    # then a stable sort by score. Repeated labels get score -1 and sort last.
    by_label = tf.argsort(labels, axis=1, stable=True)
    ranked = tf.gather(
        tf.where(first, score, tf.constant(-1.0, tf.float64)), by_label, batch_dims=1
    )
    order = tf.gather(
        by_label, tf.argsort(ranked, axis=1, direction="DESCENDING", stable=True), batch_dims=1
    )
    order = order[:, : (k if top_k is None else tf.minimum(k, int(top_k)))]
    valid = tf.gather(first, order, batch_dims=1)
    top_labels = tf.where(valid, tf.gather(labels, order, batch_dims=1), tf.constant(-1, tf.int64))
    top_probs = tf.where(
        valid, tf.exp(tf.gather(logits, order, batch_dims=1) - log_norm[:, None]), 0.0
    )
    top_probs = tf.cast(top_probs, tf.float32)
    return top_labels[:, 0], top_probs[:, 0], top_labels, top_probs
