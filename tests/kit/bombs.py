"""Small files that declare huge images (decompression bombs), written without holding the pixels.

`write_png_bomb(path, side)` writes a valid greyscale 8-bit PNG of side x side black pixels: one
deflate block of `ROWS_PER_BLOCK` zero rows, compressed once and repeated (each ends with a full
flush, so the copies are independent), with the zlib checksum of the whole raw stream. 20000 x
20000 (400 Mpx; ~10 GB once decoded to float32 RGB) is ~390 KB and takes about a second.
The other writers give only the header that declares the size (enough to be refused).
"""

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS_PER_BLOCK = 500


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path, side=20000):
    """A valid side x side greyscale PNG of zeros at `path`; returns its size in bytes."""
    rows = b"\0" * ((side + 1) * ROWS_PER_BLOCK)  # each row: filter byte 0 + side pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(side, ROWS_PER_BLOCK)
    tail_rows = rows[: (side + 1) * rest]
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    last = tail.compress(tail_rows) + tail.flush(zlib.Z_FINISH)
    checksum = 1
    for _ in range(full):
        checksum = zlib.adler32(rows, checksum)
    checksum = zlib.adler32(tail_rows, checksum)
    stream = b"\x78\xda" + block * full + last + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", stream)
        + _png_chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def gif_header(width, height):
    """A GIF89a header and logical screen declaring width x height (no image data)."""
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b";"


def gif_frames(screen, frames):
    """A GIF89a with a `screen` (width, height) logical screen, a comment extension, and one
    image descriptor per (width, height) in `frames`, each with a few bytes of (not decodable)
    image data in two sub-blocks: the structure a decoder walks, declaring what it would hold."""
    comment = b"\x21\xfe" + b"\x03abc" + b"\x00"
    images = b"".join(
        b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02" + b"\x02\x4c\x01\x01\x00\x00"
        for w, h in frames
    )
    return b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0) + comment + images + b";"


def bmp_header(width, height):
    """A 24-bit BMP file and info header declaring width x height (no pixel data)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def webp_vp8x_header(width, height):
    """A RIFF/WEBP file with a VP8X chunk declaring a width x height canvas (no frame)."""
    sides = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = bytes([0, 0, 0, 0]) + sides
    chunk = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_declaring(jpeg, width, height):
    """`jpeg` (baseline JPEG bytes) with its SOF0 marker rewritten to declare width x height."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]
