"""Generalised-mean (GeM) pooling: `(mean_hw max(x, eps)^p)^(1/p)`."""

import keras
import tensorflow as tf

from tfmet.layers.vector_pooling import VectorPooling


def gem(x, p=3.0, eps=1e-6, axis=(1, 2)):
    """GeM-pools `x` (NHWC by default) over `axis`.

    Args:
      x: feature map, e.g. [B, H, W, C].
      p: the power; a float or a scalar tensor. p=1 is average pooling, p -> inf max pooling.
      eps: lower clamp applied before the power (a clamp, not an additive term).
      axis: the spatial axes to pool over.

    Returns:
      The pooled tensor with `axis` removed, e.g. [B, C].
    """
    x = tf.convert_to_tensor(x)
    p = tf.cast(p, x.dtype)
    pooled = tf.reduce_mean(tf.pow(tf.maximum(x, eps), p), axis=axis)
    return tf.pow(pooled, 1.0 / p)


@keras.saving.register_keras_serializable(package="tfmet")
class GeMPooling2D(VectorPooling):
    """GeM pooling over the spatial axes of an NHWC feature map, with a learnable scalar p.

    Args:
      p: initial value of the power (3.0 as in the Met reference).
      eps: clamp applied to the activations before the power.
      train_p: whether p is trainable; False freezes it.
    """

    CONFIG = ("p", "eps", "train_p")

    def __init__(self, p=3.0, eps=1e-6, train_p=True, **kwargs):
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"`p` must be positive. Received: p={p}")
        if eps <= 0:
            raise ValueError(f"`eps` must be positive. Received: eps={eps}")
        self.p = float(p)
        self.eps = float(eps)
        self.train_p = bool(train_p)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"GeMPooling2D expects a 4-D NHWC input. Received: input_shape={input_shape}"
            )
        self.power = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.p),
            trainable=self.train_p,
        )

    def call(self, inputs):
        return gem(inputs, self.power, self.eps)
