"""Top-k accuracy (function and streaming Keras metric) and flip bagging.

Tie rule: the true class is in the top k when fewer than k classes score strictly higher than it
(the rule of `tf.math.in_top_k`), so a tie at the boundary counts in the label's favour and the
result does not depend on any sort order. Labels < 0 mark a missing annotation and are ignored.
"""

import keras
import tensorflow as tf


def top_k_correct(scores, labels, k):
    """Whether each row's label is among its `k` best scores.

    Args:
      scores: [n, classes] logits or probabilities (any monotone transform gives the same result).
      labels: [n] integer class indices; negative values are never correct.
      k: positive int.

    Returns:
      bool tensor [n].
    """
    if int(k) < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k}")
    scores = tf.convert_to_tensor(scores, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    valid = labels >= 0
    true_scores = tf.gather(scores, tf.maximum(labels, 0), axis=1, batch_dims=1)
    higher = tf.reduce_sum(tf.cast(scores > true_scores[:, None], tf.int32), axis=1)
    return tf.logical_and(valid, higher < int(k))


def top_k_accuracy(scores, labels, k):
    """Fraction of the rows with a label (>= 0) whose label is in the top `k`; 0.0 if none."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    correct = tf.reduce_sum(tf.cast(top_k_correct(scores, labels, k), tf.float32))
    count = tf.reduce_sum(tf.cast(labels >= 0, tf.float32))
    return float(correct / tf.maximum(count, 1.0))


@keras.saving.register_keras_serializable(package="tfmet")
class TopKAccuracy(keras.metrics.Metric):
    """Streaming top-k accuracy over integer labels; rows with label < 0 are skipped.

    Unlike `keras.metrics.SparseTopKCategoricalAccuracy` it accepts k larger than the number of
    classes (always correct) and missing labels, and follows the tie rule of this module.

    Args:
      k: positive int.
      name: metric name (default "top{k}").
    """

    def __init__(self, k=1, name=None, dtype=None):
        if int(k) < 1:
            raise ValueError(f"`k` must be a positive integer. Received: k={k}")
        super().__init__(name=name or f"top{int(k)}", dtype=dtype)
        self.k = int(k)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        correct = tf.cast(top_k_correct(y_pred, labels, self.k), self.dtype)
        valid = tf.cast(labels >= 0, self.dtype)
        if sample_weight is not None:
            weight = tf.cast(tf.reshape(sample_weight, [-1]), self.dtype)
            correct, valid = correct * weight, valid * weight
        self.correct.assign_add(tf.reduce_sum(correct))
        self.count.assign_add(tf.reduce_sum(valid))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.count)

    def reset_state(self):
        self.correct.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {"k": self.k, "name": self.name, "dtype": self.dtype}


def bag_probabilities(*logits):
    """Mean of the softmax of each logits tensor [n, classes] (the "bagging" of RASTA)."""
    if not logits:
        raise ValueError("bag_probabilities needs at least one logits tensor. Received: none")
    probabilities = [tf.nn.softmax(tf.convert_to_tensor(x, tf.float32), axis=-1) for x in logits]
    return tf.add_n(probabilities) / float(len(probabilities))


def flip_bagged_probabilities(predict_logits, images):
    """Averages the class probabilities of `images` and of their horizontal mirror images.

    Args:
      predict_logits: callable images [n, H, W, 3] -> logits [n, classes], or a dict of them
        (one per attribute).
      images: [n, H, W, 3] NHWC tensor.

    Returns:
      probabilities [n, classes] (or a dict of them, keyed like the callable's output).
    """
    images = tf.convert_to_tensor(images)
    plain = predict_logits(images)
    mirrored = predict_logits(tf.reverse(images, axis=[2]))
    if isinstance(plain, dict):
        return {key: bag_probabilities(plain[key], mirrored[key]) for key in plain}
    return bag_probabilities(plain, mirrored)
