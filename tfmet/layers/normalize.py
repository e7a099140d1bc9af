"""L2 normalisation of descriptors along the last axis."""

import keras
import tensorflow as tf


def l2_normalize(x, eps=1e-12):
    """Divides each row by max(||x||, eps), as torch.nn.functional.normalize does."""
    x = tf.convert_to_tensor(x)
    norm = tf.norm(x, axis=-1, keepdims=True)
    return x / tf.maximum(norm, tf.cast(eps, x.dtype))


@keras.saving.register_keras_serializable(package="tfmet")
class L2Normalize(keras.layers.Layer):
    """Keras layer over `l2_normalize` (last axis).

    Args:
      eps: the smallest norm divided by, so all-zero rows stay zero instead of NaN.
    """

    def __init__(self, eps=1e-12, **kwargs):
        super().__init__(**kwargs)
        if eps <= 0:
            raise ValueError(f"`eps` must be positive. Received: eps={eps}")
        self.eps = float(eps)

    def call(self, inputs):
        return l2_normalize(inputs, self.eps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"eps": self.eps})
        return config
