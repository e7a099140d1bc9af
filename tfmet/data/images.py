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

Memory is bounded by what an input declares, before anything is decoded (docs/extraction.md):

- `read_image_bytes` reads only regular files (after following links: a FIFO, a device, a
  directory or a socket is refused without opening it for a blocking read) of at most `max_bytes`
  (default `DEFAULT_MAX_BYTES`, 64 MiB).
- `decode_image` reads the width and height the header declares (JPEG SOF, PNG IHDR, GIF logical
  screen, BMP info header, WebP VP8/VP8L/VP8X: `tfmet.data.image_headers.declared_size`) and
  refuses an image of more than `max_pixels` (default `DEFAULT_MAX_PIXELS`, Pillow's 89,478,485)
  before decoding it: a 400 KB PNG declaring 20000x20000 costs nothing instead of 10 GB.
- `decode_image` also reads the channels and sample size the header declares (JPEG SOF
  components, PNG IHDR colour type and bit depth, BMP bit count: `image_headers.declared_layout`)
  and refuses an image of more than `max_decoded_bytes` decoded bytes (default
  `DEFAULT_MAX_DECODED_BYTES`, 256 MiB): width x height x channels x bytes per sample x frames, so
  a 497 KB PNG of 7999 x 7999 RGBA 16-bit (under the pixel limit, 488 MiB decoded) is refused
  unread. 8-bit PNGs decode to 8-bit RGB.

Refusals raise `ImageRefused` (an `InvalidArgumentError`, so every caller that survives a bad
image survives these) with a one-line reason such as "image declares 20000x20000 = 400.0 Mpx, over
the limit of 89.5 Mpx".
"""

import functools
import os
import re
import stat

import tensorflow as tf

from tfmet.data.image_headers import PNG_SIGNATURE, declared_layout, declared_pixels
from tfmet.data.limits import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    SMALL_PIXELS,
    mebibytes,
    megapixels,
    over_budget,
)


class ImageRefused(tf.errors.InvalidArgumentError):
    """An input refused before decoding: not a regular file, too many bytes, too many pixels."""

    def __init__(self, message):
        super().__init__(None, None, message)


_OP_PREFIX = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_OP_SUFFIX = re.compile(r"\s*\[Op:\w+\](\s*name:.*)?$")
# `check_pixels` failing in a graph: "assertion failed: [<reason>]" + the node
_ASSERTION = re.compile(r"assertion failed: \[(image declares .*?)\]\s*(\[\[\{\{node .*)?$", re.S)


def _decode_jpeg(image_bytes):
    return tf.cast(
        tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32
    )


def _decode_png(image_bytes):
    """8-bit PNGs decode to 8-bit RGB (half the memory of decoding them at 16 bits, the same
    values); 16-bit ones at 16 bits, divided by 257."""
    sixteen = tf.strings.substr(image_bytes, 24, 1) == b"\x10"  # IHDR bit depth

    def deep():
        return tf.cast(tf.io.decode_png(image_bytes, channels=3, dtype=tf.uint16), tf.float32) / 257

    def shallow():
        return tf.cast(tf.io.decode_png(image_bytes, channels=3, dtype=tf.uint8), tf.float32)

    return tf.cond(sixteen, deep, shallow)


def _decode_other(image_bytes):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.cast(image, tf.float32)


def check_decoded_bytes(image_bytes, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES):
    """Refuses `image_bytes` whose header declares more than `max_decoded_bytes` decoded bytes:
    width x height x channels x bytes per sample x frames (`tfmet.data.limits.decoded_bytes`;
    a GIF's frames by their total area, `declared_pixels`).

    Eagerly raises `ImageRefused`; in a graph returns the op that fails with the same reason
    ("assertion failed: [<reason>]"), which decoding must depend on.
    """
    if max_decoded_bytes is None:
        return tf.no_op()
    budget = int(max_decoded_bytes)
    if budget < 1:
        raise ValueError(f"`max_decoded_bytes` must be positive or None. Received: {budget}")
    height, width, frames, pixels = declared_pixels(image_bytes)
    channels, sample = declared_layout(image_bytes)
    channels = tf.maximum(channels, 3)
    if tf.executing_eagerly():
        reason = over_budget(width, height, channels, sample, frames, budget, pixels)
        if reason:
            raise ImageRefused(reason)
        return tf.no_op()
    size = _decoded_size(pixels, channels, sample)
    animated = frames > 1
    reason = tf.strings.join(
        [
            *_declares(frames, width, height),
            tf.where(animated, " (" + tf.strings.as_string(pixels) + " px in all)", ""),
            " x ",
            tf.strings.as_string(channels),
            " channels x ",
            tf.strings.as_string(sample),
            " bytes = ",
            tf.where(
                size < 2**20,
                tf.strings.as_string(size) + " bytes",  # no thousands separators in a graph
                tf.strings.as_string(tf.cast(size, tf.float64) / 2**20, precision=1) + " MiB",
            ),
            f" decoded, over the budget of {mebibytes(budget)}",
        ]
    )
    return tf.debugging.Assert(size <= budget, [reason], name="check_decoded_bytes")


def _declares(frames, width, height):
    """In a graph: the parts of "image declares [<n> frames of up to ]<w>x<h>"."""
    return [
        "image declares ",
        tf.where(frames > 1, tf.strings.as_string(frames) + " frames of up to ", ""),
        tf.strings.as_string(width),
        "x",
        tf.strings.as_string(height),
    ]


def too_many_pixels(height, width, max_pixels, frames=1, pixels=None):
    """The refusal reason for an image declaring `frames` of up to `height` x `width` (`pixels`
    in all, default their product), or "" if it fits `max_pixels`."""
    pixels = int(height) * int(width) if pixels is None else int(pixels)
    if max_pixels is None or pixels <= int(max_pixels):
        return ""
    frames = int(frames)
    what = f"{frames} frames of up to " if frames > 1 else ""
    total = " in all" if frames > 1 else ""
    return (
        f"image declares {what}{int(width)}x{int(height)} = {megapixels(pixels)}{total}, over the "
        f"limit of {megapixels(int(max_pixels))}"
    )


def check_pixels(image_bytes, max_pixels=DEFAULT_MAX_PIXELS):
    """Refuses `image_bytes` that declare more than `max_pixels` pixels (`declared_pixels`).

    Eagerly raises `ImageRefused`; in a graph returns the op that fails with the same reason
    (`InvalidArgumentError`, "assertion failed: [<reason>]"), which decoding must depend on.
    """
    if max_pixels is None:
        return tf.no_op()
    if int(max_pixels) < 1:
        raise ValueError(f"`max_pixels` must be positive or None. Received: {max_pixels}")
    height, width, frames, pixels = declared_pixels(image_bytes)
    if tf.executing_eagerly():
        reason = too_many_pixels(height, width, max_pixels, frames, pixels)
        if reason:
            raise ImageRefused(reason)
        return tf.no_op()
    count = tf.where(
        pixels < SMALL_PIXELS,
        tf.strings.as_string(pixels) + " px",
        tf.strings.as_string(tf.cast(pixels, tf.float64) / 1e6, precision=1) + " Mpx",
    )
    reason = tf.strings.join(
        [
            *_declares(frames, width, height),
            " = ",
            count,
            tf.where(frames > 1, " in all", ""),
            ", over the limit of ",
            megapixels(int(max_pixels)),
        ]
    )
    return tf.debugging.Assert(pixels <= int(max_pixels), [reason], name="check_pixels")


def decode_image(
    image_bytes, max_pixels=DEFAULT_MAX_PIXELS, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES
):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> float32 RGB [H, W, 3] in [0, 255].

    An image whose header declares more than `max_pixels` pixels, or more than
    `max_decoded_bytes` decoded bytes (`check_decoded_bytes`: 16 bits, alpha, CMYK and frames
    multiply the pixels), is refused before it is decoded (None: no limit).

    Raises (eagerly; inside tf.data the error stops the element) `tf.errors.InvalidArgumentError`
    for data that is not a decodable image, `ImageRefused` (one of those) for too many pixels.
    `load_images` turns those into `ok=False` rows.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    # In a graph the budget's check runs after the pixels' one: an image over both is refused
    # for its pixels, as it is eagerly.
    with tf.control_dependencies([check_pixels(image_bytes, max_pixels)]):
        budget = check_decoded_bytes(image_bytes, max_decoded_bytes)
    with tf.control_dependencies([budget]):
        image_bytes = tf.identity(image_bytes)
    return decode_unchecked(image_bytes)


def within_limits(
    image_bytes, max_pixels=DEFAULT_MAX_PIXELS, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES
):
    """In a graph, the bool that `check_pixels` and `check_decoded_bytes` assert for
    `image_bytes`: its header declares at most `max_pixels` pixels and at most
    `max_decoded_bytes` decoded bytes (None: no limit). For anything but a JPEG this never
    raises (`tfmet.data.image_headers` reads past the end as zeros); a JPEG's header is read by
    `jpeg_within_limits`, which can."""
    pixels = declared_pixels(image_bytes)[3]
    channels, sample = declared_layout(image_bytes)
    return _within(pixels, channels, sample, max_pixels, max_decoded_bytes)


def jpeg_within_limits(
    image_bytes, max_pixels=DEFAULT_MAX_PIXELS, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES
):
    """`within_limits` of a JPEG, from its SOF marker alone (`tf.image.extract_jpeg_shape`,
    which raises `InvalidArgumentError` for a header too broken to hold one, as decoding
    would): a small graph, for where it is built at every call (the exports' decoding dataset)."""
    shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
    return _within(shape[0] * shape[1], shape[2], 1, max_pixels, max_decoded_bytes)


def _decoded_size(pixels, channels, sample):
    """`tfmet.data.limits.decoded_bytes` in a graph: what a decoder holds for `pixels` (all
    frames) of at least 3 `channels` of `sample` bytes."""
    return pixels * tf.maximum(channels, 3) * sample


def _within(pixels, channels, sample, max_pixels, max_decoded_bytes):
    """The conditions `check_pixels` and `check_decoded_bytes` assert, as one bool."""
    ok = tf.constant(True)
    if max_pixels is not None:
        ok &= pixels <= int(max_pixels)
    if max_decoded_bytes is not None:
        ok &= _decoded_size(pixels, channels, sample) <= int(max_decoded_bytes)
    return ok


def decode_unchecked(image_bytes):
    """`decode_image` without the header's limits: for bytes `within_limits` has passed."""
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
    if isinstance(error, ImageRefused):
        return error.message
    if isinstance(error, tf.errors.OpError):
        text = error.message
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error)
    text = _OP_SUFFIX.sub("", _OP_PREFIX.sub("", text.strip()))
    refused = _ASSERTION.search(text)  # `check_pixels` in a graph: the reason alone
    if refused:
        return refused.group(1)
    if text.startswith("Graph execution error:"):  # an op of a tf.function: its message alone
        text = text.split("\n\n")[-1].split("\n\t")[0].strip()
    return f"{type(error).__name__}: {text}"


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_size(size, max_bytes):
    if max_bytes is not None and size > max_bytes:
        raise ImageRefused(f"file holds {size:,} bytes, over the limit of {int(max_bytes):,} bytes")


def _check_file(status, max_bytes):
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(status.st_mode)), "special")
        raise ImageRefused(f"not a regular file ({kind})")
    _check_size(status.st_size, max_bytes)


def read_image_bytes(path, max_bytes=DEFAULT_MAX_BYTES):
    """The bytes of the regular file at `path` (links followed), at most `max_bytes` of them.

    Raises:
      ImageRefused: the file (after links) is a FIFO, device, directory or socket, or holds
        more than `max_bytes` bytes (None: no limit).
      OSError: it cannot be read (missing, no permission, ...).
    """
    if max_bytes is not None and int(max_bytes) < 1:
        raise ValueError(f"`max_bytes` must be positive or None. Received: {max_bytes}")
    _check_file(os.stat(path), max_bytes)
    # O_NONBLOCK: a FIFO put there after the stat does not block the open; fstat then refuses it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as f:
        status = os.fstat(f.fileno())
        _check_file(status, max_bytes)
        data = f.read() if max_bytes is None else f.read(int(max_bytes) + 1)
    _check_size(len(data), max_bytes)  # it grew after the stat
    return data


def read_image(
    path,
    max_pixels=DEFAULT_MAX_PIXELS,
    max_bytes=DEFAULT_MAX_BYTES,
    max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES,
):
    """Reads and decodes one image file eagerly -> (float32 [H, W, 3] or None, reason or "").

    `max_bytes`, `max_pixels` and `max_decoded_bytes` bound what the file may declare
    (`read_image_bytes`, `decode_image`); a refused file gives None and the reason, like an
    unreadable one.
    """
    try:
        image = decode_image(read_image_bytes(path, max_bytes), max_pixels, max_decoded_bytes)
    except (OSError, tf.errors.OpError) as e:
        return None, error_reason(e)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "ValueError: image has no pixels"
    return image, ""


def _read_image_py(path, max_pixels, max_bytes):
    image, reason = read_image(path.numpy().decode("utf-8"), max_pixels, max_bytes)
    if image is None:
        return tf.zeros([0, 0, 3], tf.float32), reason
    return image, reason


def load_image(path, max_side=None, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """Graph-compatible: path (tf.string) -> (image float32 [H, W, 3], ok bool, error tf.string).

    Failures never raise: they give an empty [0, 0, 3] image, ok=False and the reason. Files
    over `max_bytes` or declaring more than `max_pixels` pixels are failures (`read_image`).
    """
    read = functools.partial(_read_image_py, max_pixels=max_pixels, max_bytes=max_bytes)
    image, error = tf.py_function(read, [path], [tf.float32, tf.string])
    image.set_shape([None, None, 3])
    error.set_shape([])
    ok = tf.equal(error, "")
    if max_side is not None:
        image = tf.cond(ok, lambda: cap_max_side(image, max_side), lambda: image)
    return image, ok, error


def load_images(
    paths,
    max_side=None,
    num_parallel_calls=tf.data.AUTOTUNE,
    indices=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    max_bytes=DEFAULT_MAX_BYTES,
):
    """A tf.data.Dataset over image files, in order, that survives unreadable files.

    Args:
      paths: list of file paths.
      max_side: optional cap on the long side (see `cap_max_side`); None keeps native size.
        The cap applies after decoding: `max_pixels` is what bounds the decoder's memory.
      num_parallel_calls: parallel reads/decodes.
      indices: optional int64 ids to report instead of 0..len(paths)-1 (e.g. row numbers).
      max_pixels: images whose header declares more pixels are `ok=False` rows, not decoded
        (None: no limit).
      max_bytes: files larger than this are `ok=False` rows, not read (None: no limit). Only
        regular files are read: FIFOs, devices and directories are `ok=False` rows.

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
        image, ok, error = load_image(path, max_side, max_pixels, max_bytes)
        return {"index": index, "image": image, "ok": ok, "error": error}

    return dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
