"""Keras layers of the descriptor model (one public class per file)."""

from tfmet.layers.gem import GeMPooling2D, gem
from tfmet.layers.normalize import L2Normalize, l2_normalize
from tfmet.layers.projector import Projector
from tfmet.layers.token_pooling import TokenPooling, token_pool

__all__ = [
    "GeMPooling2D",
    "L2Normalize",
    "Projector",
    "TokenPooling",
    "gem",
    "l2_normalize",
    "token_pool",
]
