"""How much an input may declare before tfmet refuses to read or decode it (no TensorFlow here).

The defaults, used by every reader and decoder (`tfmet.data.images`, the exports' serving
signatures, tfmet-extract, tfmet-predict); each takes its own value as a parameter or flag.
"""

# Pillow's Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3): the size the imaging world
# already treats as a likely decompression bomb. Decoded to float32 RGB that is ~1 GB, so an image
# at the limit fits in memory; 20000 x 20000 (400 Mpx, ~10 GB decoded) is refused unread.
DEFAULT_MAX_PIXELS = 89_478_485

# 64 MiB: a 24 Mpx camera JPEG is ~10 MB and a PNG of a photograph near the pixel limit ~60 MB,
# while the Met images are tens of KB. Every image in flight (one per parallel reader) is held in
# memory as bytes before decoding, so the cap bounds that too; /dev/zero behind a link is refused
# by the regular-file check before any byte is read.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


SMALL_PIXELS = 100_000  # below this a count reads better in pixels than as "0.0 Mpx"


def megapixels(pixels):
    """`pixels` as "<x.y> Mpx" (or "<n> px" below `SMALL_PIXELS`), as refusals write them."""
    return f"{pixels} px" if pixels < SMALL_PIXELS else f"{pixels / 1e6:.1f} Mpx"


# 256 MiB of decoded samples: Pillow's pixel limit at 8-bit RGB (89,478,485 x 3 bytes is this
# budget less one byte), so every 8-bit RGB image under the pixel limit fits, while the same
# canvas at 16 bits, with alpha, in CMYK or in several frames, which multiply what a decoder holds,
# does not: a 497 KB PNG of 7999 x 7999 RGBA 16-bit declares 488 MiB and is refused unread.
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024

# What a decoder holds per pixel: the channels (at least the 3 of the RGB every reader decodes to)
# times the bytes of a sample, per PIL mode. A mode not listed counts as 4 channels of 4 bytes.
PIL_MODE_LAYOUT = {
    "1": (1, 1), "L": (1, 1), "P": (1, 1), "LA": (2, 1), "La": (2, 1), "PA": (2, 1),
    "RGB": (3, 1), "YCbCr": (3, 1), "LAB": (3, 1), "HSV": (3, 1),
    "RGBA": (4, 1), "RGBa": (4, 1), "RGBX": (4, 1), "CMYK": (4, 1),
    "I;16": (1, 2), "I;16L": (1, 2), "I;16B": (1, 2), "I;16N": (1, 2), "I": (1, 4), "F": (1, 4),
}  # fmt: skip


def decoded_bytes(width, height, channels=3, bytes_per_sample=1, frames=1):
    """The bytes a decoder holds for `frames` of `width` x `height` samples of `channels` (at
    least 3: every reader decodes to RGB) x `bytes_per_sample` bytes."""
    channels = max(int(channels), 3)
    return int(width) * int(height) * channels * int(bytes_per_sample) * max(int(frames), 1)


def mebibytes(count):
    """`count` bytes as "<x.y> MiB" (or "<n> bytes" below 1 MiB), as budget refusals write them."""
    return f"{count:,} bytes" if count < 2**20 else f"{count / 2**20:.1f} MiB"


def over_budget(width, height, channels=3, bytes_per_sample=1, frames=1, budget=None, pixels=None):
    """The refusal reason for an image declaring that layout, or "" when its decoded bytes
    (`decoded_bytes`; `pixels`: the frames' total area when they differ in size) fit `budget`
    (None: no budget). One line, e.g. "image declares 7999x7999 x 4 channels x 2 bytes = 488.2
    MiB decoded, over the budget of 256.0 MiB"."""
    if budget is None:
        return ""
    frames = max(int(frames), 1)
    pixels = int(width) * int(height) * frames if pixels is None else int(pixels)
    size = decoded_bytes(pixels, 1, channels, bytes_per_sample)
    if size <= int(budget):
        return ""
    what = f"{frames} frames of up to " if frames > 1 else ""
    total = f" ({pixels} px in all)" if frames > 1 else ""
    return (
        f"image declares {what}{int(width)}x{int(height)}{total} x {max(int(channels), 3)} "
        f"channels x {int(bytes_per_sample)} bytes = {mebibytes(size)} decoded, over the budget "
        f"of {mebibytes(int(budget))}"
    )


def pil_layout(image):
    """(channels, bytes per sample, frames) of a PIL image opened lazily (its header only).

    PIL opens a 16-bit RGB(A) PNG as "RGB"/"RGBA" and unpacks it from a ";16" raw mode (the PNG
    reader's, or the first tile's), so the raw mode decides the sample size when it says more.
    """
    channels, sample = PIL_MODE_LAYOUT.get(image.mode, (4, 4))
    tiles = getattr(image, "tile", None) or []
    rawmodes = [getattr(getattr(image, "png", None), "im_rawmode", None)]
    rawmodes += [tiles[0][3] if tiles and len(tiles[0]) > 3 else None]
    if any(isinstance(rawmode, str) and ";16" in rawmode for rawmode in rawmodes):
        sample = max(sample, 2)
    return channels, sample, int(getattr(image, "n_frames", 1) or 1)


def check_pil_budget(image, budget=DEFAULT_MAX_DECODED_BYTES):
    """The refusal reason for a lazily opened PIL `image` over `budget` decoded bytes, or ""."""
    channels, sample, frames = pil_layout(image)
    return over_budget(image.width, image.height, channels, sample, frames, budget)
