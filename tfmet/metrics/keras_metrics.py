"""GAP and Met accuracy as streaming Keras metrics, equal to `tfmet.metrics.recognition`'s on all
batches.

Both metrics take `update_state(y_true, y_pred)` with `y_true` the labels [B] (-1 for distractors)
and `y_pred` either

- a pair `(pred, conf)` or a dict `{"pred": ..., "conf": ...}` of [B] tensors (a kNN classifier's
  output; the form to use in a custom loop), or
- class scores [B, C] (a classifier's output in `model.compile(metrics=...)`): pred =
  `tf.argmax` (ties as it breaks them), conf = the maximum score; labels are class indices.

GAP is not a sum over batches (it ranks all queries together), so `GlobalAveragePrecision` keeps
every (pred, conf, label) it has seen in fixed-size variables of `capacity` entries; updating past
the capacity fails with an error saying so. Ranking follows the tie rule of
`tfmet.metrics.recognition`
(stable sort by descending confidence, ties in the order seen).
"""

import keras
import tensorflow as tf

DISTRACTOR = -1


def _unpack(y_true, y_pred):
    """(pred int64 [B], conf float64 [B], labels int64 [B]) from the accepted `y_pred` forms."""
    if isinstance(y_pred, dict):
        pred, conf = y_pred["pred"], y_pred["conf"]
    elif isinstance(y_pred, (tuple, list)):
        if len(y_pred) != 2:
            raise ValueError(
                f"`y_pred` as a sequence must be (pred, conf). Received {len(y_pred)} items"
            )
        pred, conf = y_pred
    else:
        scores = tf.convert_to_tensor(y_pred)
        if scores.shape.rank != 2:
            raise ValueError(
                "`y_pred` must be (pred, conf), {'pred', 'conf'} or class scores [batch, classes]. "
                f"Received: shape={scores.shape}"
            )
        pred = tf.argmax(scores, axis=-1)
        conf = tf.reduce_max(scores, axis=-1)
    pred = tf.cast(tf.reshape(pred, [-1]), tf.int64)
    conf = tf.cast(tf.reshape(conf, [-1]), tf.float64)
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
    tf.debugging.assert_equal(
        tf.shape(pred), tf.shape(labels), message="pred and labels must have the same length"
    )
    tf.debugging.assert_equal(
        tf.shape(conf), tf.shape(labels), message="conf and labels must have the same length"
    )
    return pred, conf, labels


def _no_sample_weight(metric, sample_weight):
    if sample_weight is not None:
        raise ValueError(
            f"{type(metric).__name__} does not support `sample_weight`. Received: {sample_weight}"
        )


@keras.saving.register_keras_serializable(package="tfmet")
class GlobalAveragePrecision(keras.metrics.Metric):
    """Streaming GAP (or GAP- with `exclude_distractors=True`) of the Met benchmark.

    Args:
      exclude_distractors: rank only the Met queries (label != -1): GAP- instead of GAP.
      capacity: the most queries the metric can hold between resets (19,319 Met test queries fit
        the default); memory is 20 bytes per entry.
      name, dtype: as for any Keras metric; `dtype` is the result's dtype, the state is int64 and
        float64 so that confidences rank exactly as in numpy.
    """

    def __init__(self, exclude_distractors=False, capacity=65536, name=None, dtype=None, **kwargs):
        if int(capacity) < 1:
            raise ValueError(f"`capacity` must be a positive integer. Received: {capacity}")
        name = name or ("gap_minus" if exclude_distractors else "gap")
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.exclude_distractors = bool(exclude_distractors)
        self.capacity = int(capacity)
        self.pred = self.add_variable((self.capacity,), "zeros", dtype="int64", name="pred")
        self.conf = self.add_variable((self.capacity,), "zeros", dtype="float64", name="conf")
        self.labels = self.add_variable((self.capacity,), "zeros", dtype="int64", name="labels")
        self.count = self.add_variable((), "zeros", dtype="int64", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        _no_sample_weight(self, sample_weight)
        pred, conf, labels = _unpack(y_true, y_pred)
        if self.exclude_distractors:
            keep = labels != DISTRACTOR
            pred, conf, labels = (tf.boolean_mask(t, keep) for t in (pred, conf, labels))
        count = tf.convert_to_tensor(self.count)
        new_count = count + tf.size(labels, out_type=tf.int64)
        tf.debugging.assert_less_equal(
            new_count,
            tf.constant(self.capacity, tf.int64),
            message=(
                f"{self.name}: more queries than capacity={self.capacity}; "
                "raise `capacity` or reset the metric"
            ),
        )
        index = (count + tf.range(tf.size(labels, out_type=tf.int64)))[:, None]
        for variable, values in ((self.pred, pred), (self.conf, conf), (self.labels, labels)):
            variable.assign(
                tf.tensor_scatter_nd_update(tf.convert_to_tensor(variable), index, values)
            )
        self.count.assign(new_count)

    def result(self):
        count = tf.convert_to_tensor(self.count)
        pred = tf.convert_to_tensor(self.pred)[:count]
        conf = tf.convert_to_tensor(self.conf)[:count]
        labels = tf.convert_to_tensor(self.labels)[:count]
        met = labels != DISTRACTOR
        rel = tf.cast(tf.logical_and(met, tf.equal(pred, labels)), tf.float64)
        rel = tf.gather(rel, tf.argsort(-conf, stable=True))
        precision = tf.cumsum(rel) / tf.cast(tf.range(1, count + 1), tf.float64)
        num_met = tf.reduce_sum(tf.cast(met, tf.float64))
        value = tf.math.divide_no_nan(tf.reduce_sum(precision * rel), num_met)
        return tf.cast(value, self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(exclude_distractors=self.exclude_distractors, capacity=self.capacity)
        return config


@keras.saving.register_keras_serializable(package="tfmet")
class MetAccuracy(keras.metrics.Metric):
    """Streaming top-1 accuracy on the Met queries (distractors, label -1, are ignored)."""

    def __init__(self, name="met_accuracy", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.correct = self.add_variable((), "zeros", dtype="int64", name="correct")
        self.total = self.add_variable((), "zeros", dtype="int64", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        _no_sample_weight(self, sample_weight)
        pred, _, labels = _unpack(y_true, y_pred)
        met = labels != DISTRACTOR
        hits = tf.logical_and(met, tf.equal(pred, labels))
        self.correct.assign_add(tf.reduce_sum(tf.cast(hits, tf.int64)))
        self.total.assign_add(tf.reduce_sum(tf.cast(met, tf.int64)))

    def result(self):
        correct = tf.cast(tf.convert_to_tensor(self.correct), tf.float64)
        total = tf.cast(tf.convert_to_tensor(self.total), tf.float64)
        return tf.cast(tf.math.divide_no_nan(correct, total), self.dtype)
