"""Image decoding and a tf.data pipeline that reads images in parallel and never dies on a bad file.

`decode_image` is a pure TensorFlow function (eager or inside `Dataset.map`): encoded bytes ->
float32 RGB [H, W, 3] in [0, 255], the image's native resolution.

- JPEG is decoded with the accurate integer IDCT, which is what PIL uses: the pixels equal the Met
  reference's `Image.open(...).convert("RGB")`, grayscale and CMYK/YCCK JPEGs included.
- PNG is decoded at 16 bits and divided by 257: 8-bit PNGs give their exact values, 16-bit PNGs
  are scaled to the 8-bit range (PIL would truncate or clip them).
- GIF (first frame), BMP and WebP go through `tf.io.decode_image`.
- Grayscale becomes RGB, alpha is dropped.

`load_images` maps a list of files to `{"index", "image", "ok", "error"}` elements in list order;
a file that cannot be read or decoded yields `ok=False`, an empty [0, 0, 3] image and the reason.
"""

import re

import tensorflow as tf

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_OP_PREFIX = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_OP_SUFFIX = re.compile(r"\s*\[Op:\w+\](\s*name:.*)?$")


def _decode_jpeg(image_bytes):
    return tf.cast(
        tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32
    )


def _decode_png(image_bytes):
    image = tf.io.decode_png(image_bytes, channels=3, dtype=tf.uint16)
    return tf.cast(image, tf.float32) / 257.0


def _decode_other(image_bytes):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.cast(image, tf.float32)


def decode_image(image_bytes):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> float32 RGB [H, W, 3] in [0, 255].

    Raises (eagerly; inside tf.data the error stops the element) `tf.errors.InvalidArgumentError`
    for data that is not a decodable image. `load_images` turns those into `ok=False` rows.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    is_png = tf.strings.substr(image_bytes, 0, len(PNG_SIGNATURE)) == PNG_SIGNATURE
    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: _decode_jpeg(image_bytes),
        lambda: tf.cond(
            is_png, lambda: _decode_png(image_bytes), lambda: _decode_other(image_bytes)
        ),
    )
    image.set_shape([None, None, 3])
    return image


def cap_max_side(image, max_side):
    """Downscales `image` [H, W, C] so that its long side is at most `max_side` (no upscaling).

    The output size is round(side * max_side / long side), at least 1; the resize is bilinear
    with antialiasing. Images already small enough are returned unchanged.
    """
    if max_side is None:
        return image
    max_side = int(max_side)
    if max_side <= 0:
        raise ValueError(f"`max_side` must be positive or None. Received: max_side={max_side}")
    shape = tf.shape(image)
    long_side = tf.maximum(shape[0], shape[1])

    def shrink():
        scale = tf.cast(max_side, tf.float64) / tf.cast(long_side, tf.float64)
        size = tf.cast(tf.round(tf.cast(shape[:2], tf.float64) * scale), tf.int32)
        size = tf.maximum(size, 1)
        return tf.image.resize(image, size, method="bilinear", antialias=True)

    return tf.cond(long_side > max_side, shrink, lambda: tf.cast(image, tf.float32))


def error_reason(error):
    """A one-line reason for a read/decode failure, without TF's op decorations."""
    if isinstance(error, tf.errors.OpError):
        text = error.message
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error)
    text = _OP_SUFFIX.sub("", _OP_PREFIX.sub("", text.strip()))
    return f"{type(error).__name__}: {text}"


def read_image(path):
    """Reads and decodes one image file eagerly -> (float32 [H, W, 3] or None, reason or "")."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = decode_image(data)
    except (OSError, tf.errors.OpError) as e:
        return None, error_reason(e)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "ValueError: image has no pixels"
    return image, ""


def _read_image_py(path):
    image, reason = read_image(path.numpy().decode("utf-8"))
    if image is None:
        return tf.zeros([0, 0, 3], tf.float32), reason
    return image, reason


def load_image(path, max_side=None):
    """Graph-compatible: path (tf.string) -> (image float32 [H, W, 3], ok bool, error tf.string).

    Failures never raise: they give an empty [0, 0, 3] image, ok=False and the reason.
    """
    image, error = tf.py_function(_read_image_py, [path], [tf.float32, tf.string])
    image.set_shape([None, None, 3])
    error.set_shape([])
    ok = tf.equal(error, "")
    if max_side is not None:
        image = tf.cond(ok, lambda: cap_max_side(image, max_side), lambda: image)
    return image, ok, error


def load_images(paths, max_side=None, num_parallel_calls=tf.data.AUTOTUNE, indices=None):
    """A tf.data.Dataset over image files, in order, that survives unreadable files.

    Args:
      paths: list of file paths.
      max_side: optional cap on the long side (see `cap_max_side`); None keeps native size.
      num_parallel_calls: parallel reads/decodes.
      indices: optional int64 ids to report instead of 0..len(paths)-1 (e.g. row numbers).

    Returns:
      Dataset of dicts {"index": int64, "image": float32 [H, W, 3] in [0, 255], "ok": bool,
      "error": string ("" when ok)}.
    """
    paths = [str(p) for p in paths]
    if indices is None:
        indices = range(len(paths))
    indices = tf.constant(list(indices), tf.int64, shape=[len(paths)])
    dataset = tf.data.Dataset.from_tensor_slices(
        (indices, tf.constant(paths, tf.string, shape=[len(paths)]))
    )

    def load(index, path):
        image, ok, error = load_image(path, max_side)
        return {"index": index, "image": image, "ok": ok, "error": error}

    return dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
