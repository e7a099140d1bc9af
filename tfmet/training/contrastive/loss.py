"""The contrastive loss of the Met reference on L2-normalised embeddings (margin 1.8)."""

import keras
import tensorflow as tf

from tfmet.training.contrastive.config import MARGIN

EPS = 1e-9  # added to d^2 under the square root, as the reference


def pair_squared_distances(first, second):
    """||first - second||^2 per row; `first`, `second` are [B, D]."""
    first = tf.convert_to_tensor(first, tf.float32)
    second = tf.convert_to_tensor(second, tf.float32)
    return tf.reduce_sum(tf.square(second - first), axis=-1)


def contrastive_loss(first, second, labels, margin=MARGIN, eps=EPS):
    """Per-pair contrastive loss [B].

    Args:
      first, second: embeddings [B, D] of the two images of each pair.
      labels: [B], 1 for a positive (same class) pair, 0 for a negative pair.
      margin: negatives closer than `margin` are pushed apart.
      eps: added to the squared distance before the square root (keeps its gradient finite).

    Returns:
      0.5 * [y d^2 + (1 - y) relu(margin - sqrt(d^2 + eps))^2], one value per pair.
    """
    squared = pair_squared_distances(first, second)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.float32)
    hinge = tf.nn.relu(margin - tf.sqrt(squared + eps))
    return 0.5 * (labels * squared + (1.0 - labels) * tf.square(hinge))


@keras.saving.register_keras_serializable(package="tfmet")
class ContrastiveLoss(keras.losses.Loss):
    """Keras loss over `contrastive_loss`.

    `y_true` holds the pair labels [B] (1 positive, 0 negative); `y_pred` the two embeddings of
    each pair stacked as [B, 2, D]. The default reduction averages over pairs, as the reference.

    Args:
      margin: the margin of the negatives' hinge (1.8 in the reference).
      eps: added to d^2 under the square root.
    """

    def __init__(
        self, margin=MARGIN, eps=EPS, reduction="sum_over_batch_size", name=None, **kwargs
    ):
        if margin <= 0:
            raise ValueError(f"`margin` must be positive. Received: margin={margin}")
        if eps < 0:
            raise ValueError(f"`eps` must be non-negative. Received: eps={eps}")
        super().__init__(name=name or "contrastive_loss", reduction=reduction, **kwargs)
        self.margin = float(margin)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        return contrastive_loss(y_pred[:, 0], y_pred[:, 1], y_true, self.margin, self.eps)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "eps": self.eps})
        return config
