"""Pooling a vision transformer's tokens into one vector: the CLS token or the patch mean."""

import keras
import tensorflow as tf

from tfmet.layers.vector_pooling import VectorPooling

MODES = ("cls", "avg")


def token_pool(tokens, mode="cls", num_prefix_tokens=1):
    """[B, T, C] tokens -> [B, C].

    Args:
      tokens: class token first, then `num_prefix_tokens - 1` register tokens, then patches.
      mode: "cls" (the class token; Hugging Face's `pooler_output` when the tokens are the
        final-norm ones) or "avg" (mean of the patch tokens, registers excluded).
      num_prefix_tokens: class + register tokens.
    """
    if mode == "cls":
        return tokens[:, 0]
    return tf.reduce_mean(tokens[:, num_prefix_tokens:], axis=1)


@keras.saving.register_keras_serializable(package="tfmet")
class TokenPooling(VectorPooling):
    """`token_pool` as a layer.

    Args:
      mode: "cls" or "avg".
      num_prefix_tokens: class + register tokens before the patch tokens.
    """

    CONFIG = ("mode", "num_prefix_tokens")

    def __init__(self, mode="cls", num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        if int(num_prefix_tokens) < 1:
            raise ValueError(
                f"`num_prefix_tokens` must be >= 1. Received: num_prefix_tokens={num_prefix_tokens}"
            )
        self.mode = mode
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, tokens):
        return token_pool(tokens, self.mode, self.num_prefix_tokens)
