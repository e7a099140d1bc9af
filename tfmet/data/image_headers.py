"""What an encoded image declares in its header, read without decoding it: size, frames, layout.

TensorFlow ops (eager, inside `Dataset.map` or a `tf.function`), so that `tfmet.data.images` can
refuse an input by what it declares before it spends memory decoding it:

- `declared_pixels` / `declared_size`: height and width (JPEG SOF, PNG IHDR, GIF logical screen
  and every frame's image descriptor, BMP info header, WebP VP8/VP8L/VP8X), GIF frames and the
  total area;
- `declared_layout`: channels and bytes per sample (JPEG SOF components, PNG IHDR colour type
  and bit depth, BMP bit count).
"""

import tensorflow as tf

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_HEADER_BYTES = 32  # every supported format but JPEG declares its size in the first 30 bytes


def _header(image_bytes):
    """The first 32 bytes of `image_bytes`, zero-padded when shorter: (string, int64 [32])."""
    head = tf.strings.substr(image_bytes, 0, _HEADER_BYTES) + b"\0" * _HEADER_BYTES
    head = tf.strings.substr(head, 0, _HEADER_BYTES)
    return head, tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _little(head, start, length):
    return sum(head[start + k] * (256**k) for k in range(length))


def _big(head, start, length):
    return sum(head[start + k] * (256 ** (length - 1 - k)) for k in range(length))


def _bmp_size(head):
    core = _little(head, 14, 4) == 12  # BITMAPCOREHEADER: 16-bit sides
    width = tf.where(core, _little(head, 18, 2), _little(head, 18, 4))
    height = tf.where(core, _little(head, 20, 2), _little(head, 22, 4))
    height = tf.where(~core & (height >= 2**31), 2**32 - height, height)  # top-down: negative
    return height, width


def _webp_size(head, chunk):
    vp8l = _little(head, 21, 4)
    vp8x = (_little(head, 27, 3) + 1, _little(head, 24, 3) + 1)
    lossy = (_little(head, 28, 2) % 16384, _little(head, 26, 2) % 16384)
    lossless = ((vp8l // 16384) % 16384 + 1, vp8l % 16384 + 1)
    height = tf.where(chunk == b"VP8X", vp8x[0], tf.where(chunk == b"VP8L", lossless[0], lossy[0]))
    width = tf.where(chunk == b"VP8X", vp8x[1], tf.where(chunk == b"VP8L", lossless[1], lossy[1]))
    known = (chunk == b"VP8X") | (chunk == b"VP8L") | (chunk == b"VP8 ")
    return tf.where(known, height, -1), tf.where(known, width, -1)


_GIF_IMAGE, _GIF_EXTENSION = 0x2C, 0x21


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def _gif_frames(image_bytes):
    """(frames, their total area, height and width of the largest) of a GIF's image descriptors.

    giflib reads every frame of a GIF into memory (one byte per pixel of each frame's own size)
    before TensorFlow keeps the first, and a frame may be far larger than the logical screen: the
    blocks are walked (sub-blocks skipped by their length bytes) to add them up. A tf.function, so
    that eager callers run the loop as a graph.
    """
    data = tf.io.decode_raw(image_bytes + b"\0" * 16, tf.uint8)  # reads past the end give 0
    size = tf.size(data, out_type=tf.int64) - 16

    def gather(positions):
        return tf.cast(tf.gather(data, tf.minimum(positions, size + 15)), tf.int64)

    def byte(i):
        return gather(tf.cast(i, tf.int64))

    def table(packed):  # a colour table of 3 * 2^(n+1) bytes follows when bit 7 is set
        return tf.where(
            packed >= 128, tf.bitwise.left_shift(tf.constant(3, tf.int64), packed % 8 + 1), 0
        )

    # Encoders write full 255-byte sub-blocks: a chain of them is jumped in one step by looking
    # at the length bytes 256 apart (up to 1024 at once), so a 64 MiB GIF takes ~300 steps.
    strides = tf.range(1024, dtype=tf.int64) * 256

    def next_sub_block(p):
        full = tf.cast(gather(p + strides) == 255, tf.int32)
        run = tf.argmin(tf.concat([full, [0]], axis=0), output_type=tf.int64)  # leading 255s
        return tf.where(run > 0, p + 256 * run, p + 1 + byte(p))

    def skip_sub_blocks(pos):  # each: a length byte and its data; a 0 length ends the run
        return tf.while_loop(lambda p: byte(p) > 0, next_sub_block, [pos])[0] + 1

    def body(pos, frames, total, largest, height, width, done):
        b = byte(pos)
        image = b == _GIF_IMAGE
        extension = b == _GIF_EXTENSION
        w = byte(pos + 5) + 256 * byte(pos + 6)
        h = byte(pos + 7) + 256 * byte(pos + 8)
        bigger = image & (w * h > largest)
        data_start = tf.where(image, pos + 11 + table(byte(pos + 9)), pos + 2)
        next_pos = tf.cond(image | extension, lambda: skip_sub_blocks(data_start), lambda: pos)
        return (
            next_pos,
            frames + tf.cast(image, tf.int64),
            total + tf.where(image, w * h, 0),
            tf.where(bigger, w * h, largest),
            tf.where(bigger, h, height),
            tf.where(bigger, w, width),
            ~image & ~extension,  # the trailer, or anything unexpected
        )

    zero = tf.constant(0, tf.int64)
    start = 13 + table(byte(10))
    state = (start, zero, zero, zero, zero, zero, tf.constant(False))
    state = tf.while_loop(lambda pos, *rest: ~rest[-1] & (pos < size), body, state)
    return state[1], state[2], state[4], state[5]


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def declared_pixels(image_bytes):
    """(height, width, frames, pixels) int64 scalars an image declares, without decoding it.

    JPEG: the SOF marker (`tf.image.extract_jpeg_shape`; a header too broken to hold one raises
    `InvalidArgumentError`, as decoding would). PNG: IHDR. BMP: the info header. WebP: the VP8X
    canvas, or the VP8 / VP8L frame. GIF: the logical screen and every frame's image descriptor
    (`_gif_frames`): the larger of the screen and the largest frame, the number of frames, and the
    larger of the screen's and the frames' total area. Other formats: one frame of height x
    width. (-1, -1, 1, 1) for anything else (which the decoder then refuses). A tf.function of
    TensorFlow ops (one graph call eagerly, ~1 ms; or inside `Dataset.map` / `tf.function`).
    """
    text, head = _header(image_bytes)

    def magic(start, value):
        return tf.strings.substr(text, start, len(value)) == value

    unknown = tf.constant(-1, tf.int64)
    png = (_big(head, 20, 4), _big(head, 16, 4))
    gif = (_little(head, 8, 2), _little(head, 6, 2))
    bmp = _bmp_size(head)
    webp = _webp_size(head, tf.strings.substr(text, 12, 4))
    is_png = magic(0, PNG_SIGNATURE)
    is_gif = magic(0, b"GIF")
    is_bmp = magic(0, b"BM")
    is_webp = magic(0, b"RIFF") & magic(8, b"WEBP")
    sizes = []
    for axis in (0, 1):
        value = unknown
        for found, size in ((is_webp, webp), (is_bmp, bmp), (is_gif, gif), (is_png, png)):
            value = tf.where(found, size[axis], value)
        sizes.append(value)
    one = tf.constant(1, tf.int64)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0], shape[1], one, shape[0] * shape[1]

    def animation():
        frames, total, height, width = _gif_frames(image_bytes)
        screen = gif[0] * gif[1]
        frame_bigger = height * width > screen
        return (
            tf.where(frame_bigger, height, gif[0]),
            tf.where(frame_bigger, width, gif[1]),
            tf.maximum(frames, 1),
            tf.maximum(total, screen),
        )

    def still():
        return sizes[0], sizes[1], one, sizes[0] * sizes[1]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, lambda: tf.cond(is_gif, animation, still))


def declared_size(image_bytes):
    """(height, width) int64 scalars an image's header declares (see `declared_pixels`)."""
    height, width, _, _ = declared_pixels(image_bytes)
    return height, width


# PNG colour types: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def declared_layout(image_bytes):
    """(channels, bytes per sample) int64 scalars an image's header declares, without decoding.

    JPEG: the SOF's components (1 grey, 3 YCbCr, 4 CMYK/YCCK), 1 byte. PNG: IHDR's colour type
    and bit depth (2 bytes at 16 bits). BMP: 4 channels at 32 bits per pixel, else 3. WebP: 4
    (the decoder works in RGBA). GIF and anything else: 3 channels of 1 byte (GIF frames are
    counted by `declared_pixels`).
    """
    text, head = _header(image_bytes)
    three, one = tf.constant(3, tf.int64), tf.constant(1, tf.int64)
    is_png = tf.strings.substr(text, 0, len(PNG_SIGNATURE)) == PNG_SIGNATURE
    colour, depth = head[25], head[24]
    png_channels = three
    for kind, count in _PNG_CHANNELS.items():
        png_channels = tf.where(tf.equal(colour, kind), tf.constant(count, tf.int64), png_channels)
    png_sample = tf.where(depth > 8, tf.constant(2, tf.int64), one)
    is_bmp = tf.strings.substr(text, 0, 2) == b"BM"
    bmp_channels = tf.where(_little(head, 28, 2) == 32, tf.constant(4, tf.int64), three)
    is_webp = (tf.strings.substr(text, 0, 4) == b"RIFF") & (
        tf.strings.substr(text, 8, 4) == b"WEBP"
    )

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(image_bytes)[2], tf.int64), one

    def other():
        channels = tf.where(is_png, png_channels, tf.where(is_bmp, bmp_channels, three))
        channels = tf.where(is_webp, tf.constant(4, tf.int64), channels)
        return channels, tf.where(is_png, png_sample, one)

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
