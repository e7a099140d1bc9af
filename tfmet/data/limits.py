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
