"""Image resizing for multi-scale extraction.

`torch_bilinear_resize` reproduces PyTorch's
`F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)` (no antialiasing) on NHWC
tensors: output size floor(n * s) (computed in float64), source coordinate
`max((dst + 0.5) / s - 0.5, 0)` in float32, neighbours floor(src) and min(floor(src) + 1, n - 1).
`tf.image.resize` maps with in/out instead of 1/s, which is close but not bit-compatible.
"""

import tensorflow as tf

RESIZE_METHODS = ("torch", "tf")


def scaled_size(n, scale):
    """floor(n * scale) as PyTorch computes it (double precision), at least 1."""
    size = tf.floor(tf.cast(n, tf.float64) * tf.constant(scale, tf.float64))
    return tf.maximum(tf.cast(size, tf.int32), 1)


def _source_taps(n, scale):
    """Indices (i0, i1) and weight of i1 for each output position along one axis."""
    out = scaled_size(n, scale)
    inv_scale = tf.constant(1.0 / scale, tf.float32)  # 1/s in double, then float, as torch does
    dst = tf.cast(tf.range(out), tf.float32)
    src = tf.maximum(inv_scale * (dst + 0.5) - 0.5, 0.0)
    i0 = tf.cast(src, tf.int32)  # src >= 0, so truncation is floor
    i1 = tf.minimum(i0 + 1, n - 1)
    return i0, i1, src - tf.cast(i0, tf.float32)


def _lerp_axis(images, n, scale, axis):
    i0, i1, lam = _source_taps(n, scale)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    lam = tf.reshape(lam, shape)
    lo = tf.gather(images, i0, axis=axis)
    hi = tf.gather(images, i1, axis=axis)
    return lo * (1.0 - lam) + hi * lam


def torch_bilinear_resize(images, scale):
    """Bilinear resize by `scale` with PyTorch scale_factor semantics; `images` is [B, H, W, C]."""
    scale = float(scale)
    if scale <= 0:
        raise ValueError(f"`scale` must be positive. Received: scale={scale}")
    images = tf.convert_to_tensor(images, tf.float32)
    if scale == 1.0:
        return images
    shape = tf.shape(images)
    images = _lerp_axis(images, shape[1], scale, axis=1)
    return _lerp_axis(images, shape[2], scale, axis=2)


def tf_bilinear_resize(images, scale):
    """`tf.image.resize` (bilinear, no antialias) to the same output size as the torch method."""
    scale = float(scale)
    images = tf.convert_to_tensor(images, tf.float32)
    if scale == 1.0:
        return images
    shape = tf.shape(images)
    size = tf.stack([scaled_size(shape[1], scale), scaled_size(shape[2], scale)])
    return tf.image.resize(images, size, method="bilinear", antialias=False)


def resize(images, scale, method="torch"):
    """Resizes NHWC `images` by `scale` with `method` ("torch" for fidelity, or "tf")."""
    if method == "torch":
        return torch_bilinear_resize(images, scale)
    if method == "tf":
        return tf_bilinear_resize(images, scale)
    raise ValueError(f"`method` must be one of {RESIZE_METHODS}. Received: method={method!r}")
