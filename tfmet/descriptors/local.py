"""Local features from the backbone pass that gives the global descriptor.

For spatial verification (`tfmet.retrieval.spatial`) each image keeps up to `num` local
features: the positions of a feature map -- a CNN's stride-16 map (the layer its family names,
`Family.local_layer`) or a vision transformer's patch tokens -- with the largest L2 norm (the
keypoint score, as DELF's attention-free baseline does), each with

    point       (x, y) of the cell's centre in the original image, as fractions of its long side
    descriptor  the cell's feature, projected to `dim` dimensions when it has more, L2-normalised
    score       the feature's norm before projection

At several scales (the multi-scale passes of the global descriptor) each scale proposes its
`num` best and the `num` best of all of them are kept. The projection is a fixed orthonormal
[C, dim] matrix drawn from `seed` (`projection_matrix`): it needs no second pass over the
database, and cosines survive it to within a few percent (Johnson-Lindenstrauss); stores
record the seed and the dimension so that query and database always agree.
"""

import dataclasses

import numpy as np
import tensorflow as tf

DEFAULT_NUM = 200
DEFAULT_DIM = 128
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class LocalSpec:
    """How many local features an image keeps, and their dimension (see the module doc)."""

    num: int = DEFAULT_NUM
    dim: int = DEFAULT_DIM
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        for name in ("num", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")

    def metadata(self):
        """The manifest entry "local_features" of stores that keep local features."""
        return {"num": self.num, "dim": self.dim, "seed": self.seed}


def projection_matrix(channels, dim=DEFAULT_DIM, seed=DEFAULT_SEED):
    """A [channels, dim] matrix with orthonormal columns (QR of a seeded Gaussian), or None when
    `channels` <= `dim` (the features are kept as they are)."""
    channels, dim = int(channels), int(dim)
    if dim <= 0:
        raise ValueError(f"`dim` must be positive. Received: dim={dim}")
    if channels <= dim:
        return None
    gaussian = np.random.default_rng(seed).standard_normal((channels, dim))
    q, r = np.linalg.qr(gaussian)
    return (q * np.sign(np.diag(r))).astype(np.float32)  # a unique Q: diag(R) > 0


def select(feature_map, cell_size, long_side, num, projection=None):
    """The `num` strongest cells of each map of a batch (fewer when a map has fewer cells).

    Args:
      feature_map: [B, h, w, C] float.
      cell_size: (height, width) of one cell in original-image pixels, float [2].
      long_side: the original image's long side, in pixels.
      num: how many cells to keep.
      projection: None or a [C, d] matrix (`projection_matrix`).

    Returns:
      points [B, n, 2] (x, y as fractions of `long_side`), descriptors [B, n, d] L2-normalised,
      scores [B, n] (norms, descending), all float32; n = min(num, h * w).
    """
    feature_map = tf.cast(feature_map, tf.float32)
    shape = tf.shape(feature_map)
    width = shape[2]
    flat = tf.reshape(feature_map, tf.stack([shape[0], shape[1] * width, shape[3]]))
    norms = tf.norm(flat, axis=-1)
    count = tf.minimum(int(num), shape[1] * width)
    scores, index = tf.math.top_k(norms, k=count, sorted=True)
    chosen = tf.gather(flat, index, batch_dims=1)
    if projection is not None:
        chosen = tf.einsum("bnc,cd->bnd", chosen, tf.constant(projection, tf.float32))
    descriptors = tf.math.l2_normalize(chosen, axis=-1, epsilon=1e-30)  # tiny maps too
    cell = tf.cast(cell_size, tf.float32)
    rows = tf.cast(index // width, tf.float32)
    columns = tf.cast(index % width, tf.float32)
    points = tf.stack([(columns + 0.5) * cell[1], (rows + 0.5) * cell[0]], axis=-1)
    return points / tf.cast(long_side, tf.float32), descriptors, scores


def merge(selections, num):
    """The `num` best-scored features of several `select` results (one per scale)."""
    points = tf.concat([s[0] for s in selections], axis=1)
    descriptors = tf.concat([s[1] for s in selections], axis=1)
    scores = tf.concat([s[2] for s in selections], axis=1)
    count = tf.minimum(int(num), tf.shape(scores)[1])
    scores, index = tf.math.top_k(scores, k=count, sorted=True)
    points = tf.gather(points, index, batch_dims=1)
    return points, tf.gather(descriptors, index, batch_dims=1), scores
