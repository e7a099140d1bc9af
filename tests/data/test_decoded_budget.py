"""The decoded-bytes budget (issue #27): width x height x channels x bytes per sample x frames,
read from the header and checked before decoding, by every reader (TensorFlow's `decode_image`
and the readers above it, the exports' graphs, PIL's header for uploads and thumbnails).

Headers only: an image declaring 7999 x 7999 RGBA 16-bit is a few bytes here, never decoded.
"""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfmet.data import image_headers, images, limits
from tfmet.serving.uploads import BadImage, check_image

HOSTILE = (
    "image declares 7999x7999 x 4 channels x 2 bytes = 488.2 MiB decoded, over the budget of "
    "256.0 MiB"
)


def png(width, height, bit_depth, colour_type, pixels=None):
    """A PNG of that layout; `pixels` (bytes of every row, filter bytes included) or none (its
    header alone: refused before the missing data could matter)."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(pixels)) if pixels is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b"")


def test_the_budget_is_pillows_pixel_limit_at_8_bit_rgb():
    assert limits.DEFAULT_MAX_DECODED_BYTES == 256 * 2**20
    at_the_pixel_limit = limits.decoded_bytes(limits.DEFAULT_MAX_PIXELS, 1)
    assert at_the_pixel_limit == limits.DEFAULT_MAX_DECODED_BYTES - 1


def test_budget_math_of_the_hostile_png_by_its_header_only():
    # 7999 x 7999 = 64.0 Mpx: under the upload's 64 Mpx and the 89.5 Mpx pixel limits
    assert limits.decoded_bytes(7999, 7999, channels=4, bytes_per_sample=2) == 511_872_008
    assert limits.over_budget(7999, 7999, 4, 2, budget=limits.DEFAULT_MAX_DECODED_BYTES) == HOSTILE
    data = png(7999, 7999, 16, 6)
    assert len(data) == 45
    assert [int(v) for v in image_headers.declared_layout(data)] == [4, 2]
    assert [int(v) for v in image_headers.declared_pixels(data)] == [7999, 7999, 1, 63_984_001]
    with Image.open(io.BytesIO(data)) as image:
        assert limits.pil_layout(image) == (4, 2, 1)
        assert limits.check_pil_budget(image) == HOSTILE


@pytest.mark.parametrize(
    "bit_depth, colour_type, layout",
    [(8, 0, [1, 1]), (16, 0, [1, 2]), (8, 2, [3, 1]), (16, 2, [3, 2]), (8, 3, [1, 1]),
     (8, 4, [2, 1]), (16, 4, [2, 2]), (8, 6, [4, 1]), (16, 6, [4, 2])],
)  # fmt: skip
def test_png_layouts(bit_depth, colour_type, layout):
    assert [
        int(v) for v in image_headers.declared_layout(png(10, 10, bit_depth, colour_type))
    ] == layout


def test_jpeg_layouts_read_the_sof_components():
    for mode, channels in (("L", 1), ("RGB", 3), ("CMYK", 4)):
        buffer = io.BytesIO()
        Image.new(mode, (16, 8)).save(buffer, format="JPEG")
        assert [int(v) for v in image_headers.declared_layout(buffer.getvalue())] == [channels, 1]


def test_decode_image_refuses_over_the_budget_eagerly_and_in_a_graph():
    data = png(7999, 7999, 16, 6)
    with pytest.raises(images.ImageRefused) as refused:
        images.decode_image(data)
    assert refused.value.message == HOSTILE

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def decode(image_bytes):
        return images.decode_image(image_bytes)

    with pytest.raises(tf.errors.InvalidArgumentError) as failed:
        decode(tf.constant(data))
    assert images.error_reason(failed.value) == HOSTILE


def test_a_small_budget_counts_channels_samples_and_frames():
    # 100 x 100: RGB 8-bit 30,000 bytes; grey counts as RGB (decoded to it); 16-bit RGBA 80,000
    rows = b"".join(b"\0" + bytes(100 * 8) for _ in range(100))
    deep = png(100, 100, 16, 6, rows)
    assert images.decode_image(deep, max_decoded_bytes=80_000).shape == (100, 100, 3)
    with pytest.raises(images.ImageRefused) as refused:
        images.decode_image(deep, max_decoded_bytes=79_999)
    assert refused.value.message == (
        "image declares 100x100 x 4 channels x 2 bytes = 80,000 bytes decoded, over the budget "
        "of 79,999 bytes"
    )
    frames = [Image.new("RGB", (40, 30), (50 * i, 0, 0)) for i in range(5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], disposal=2)
    gif = buffer.getvalue()
    assert images.decode_image(gif, max_decoded_bytes=5 * 40 * 30 * 3).shape == (30, 40, 3)
    with pytest.raises(images.ImageRefused) as refused:
        images.decode_image(gif, max_decoded_bytes=5 * 40 * 30 * 3 - 1)
    assert refused.value.message == (
        "image declares 5 frames of up to 40x30 (6000 px in all) x 3 channels x 1 bytes = 18,000 "
        "bytes decoded, over the budget of 17,999 bytes"
    )
    with Image.open(io.BytesIO(gif)) as image:
        assert limits.pil_layout(image)[2] == 5
        assert limits.check_pil_budget(image, 17_999) == refused.value.message


def test_8_bit_pngs_decode_to_their_exact_values_and_16_bit_ones_scaled():
    values = (np.arange(6 * 5 * 3) * 7 % 256).astype(np.uint8).reshape(5, 6, 3)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    np.testing.assert_array_equal(images.decode_image(buffer.getvalue()).numpy(), values)
    deep = np.full((2, 3, 3), 65535, ">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in deep)
    np.testing.assert_array_equal(images.decode_image(png(3, 2, 16, 2, rows)).numpy(), 255.0)


def test_readers_name_the_file_and_the_budget(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(7999, 7999, 16, 6))
    assert images.read_image(str(path)) == (None, HOSTILE)
    rows = [element for element in images.load_images([str(path)])]
    assert rows[0]["error"].numpy().decode() == HOSTILE and not rows[0]["ok"]


def test_uploads_over_the_budget_are_422():
    with pytest.raises(BadImage) as refused:
        check_image(png(7999, 7999, 16, 6))
    assert (refused.value.status, str(refused.value)) == (422, HOSTILE)
    assert check_image(png(7999, 7999, 8, 2)) == ("PNG", 7999, 7999)  # 183 MiB: fits


def test_thumbnails_over_the_budget_are_refused_before_decoding():
    from tfmet.serving.gallery import _jpeg_thumbnail

    with pytest.raises(ValueError) as refused:
        _jpeg_thumbnail(png(7999, 7999, 16, 6), 160)
    assert str(refused.value) == HOSTILE


def test_an_image_over_both_limits_is_refused_for_its_pixels_in_a_graph_too():
    data = png(20000, 20000, 16, 6)  # 400 Mpx and 2.98 GiB decoded
    pixels = "image declares 20000x20000 = 400.0 Mpx, over the limit of 89.5 Mpx"
    with pytest.raises(images.ImageRefused) as refused:
        images.decode_image(data)
    assert refused.value.message == pixels

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def decode(image_bytes):
        return images.decode_image(image_bytes)

    for _ in range(5):  # the budget's check depends on the pixels' one: never the other message
        with pytest.raises(tf.errors.InvalidArgumentError) as failed:
            decode(tf.constant(data))
        assert images.error_reason(failed.value) == pixels


def test_within_limits_is_the_checks_bool_and_never_fails_on_other_bytes_than_jpeg():
    # The exports check headers with `within_limits` outside the decoding dataset (whose
    # ignore_errors would have caught a failure), so for anything but a JPEG it must answer for
    # any bytes at all; a JPEG's SOF marker is read inside the dataset (`jpeg_within_limits`).
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 7, 33, 300)]
    cases = [
        (png(7999, 7999, 16, 6), False),  # 488 MiB decoded: over the 256 MiB budget
        (png(7999, 7999, 8, 0), True),  # 61 Mpx grey: 183 MiB as RGB, under both limits
        (png(10_000, 10_000, 8, 0), False),  # 100 Mpx: over Pillow's 89.5 Mpx
        (png(7999, 7999, 16, 6)[:20], True),  # IHDR cut short: declares 0 x 0
        *[(b, True) for b in noise],  # no header: declares nothing
        (b"\x89PNG\r\n\x1a\n", True),
        (b"GIF89a\xff\xff", True),
    ]
    check = tf.function(
        lambda data: tf.map_fn(images.within_limits, data, fn_output_signature=tf.bool),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    got = check(tf.constant([data for data, _ in cases])).numpy().tolist()
    assert got == [expected for _, expected in cases]


def test_jpeg_within_limits_reads_the_sof_marker():
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(small, format="JPEG")
    small = small.getvalue()
    assert bool(images.jpeg_within_limits(small))
    assert not bool(images.jpeg_within_limits(small, max_pixels=64 * 48 - 1))
    assert bool(images.jpeg_within_limits(small, max_pixels=64 * 48))
    assert not bool(images.jpeg_within_limits(small, max_decoded_bytes=64 * 48 * 3 - 1))
    with pytest.raises(tf.errors.InvalidArgumentError):
        images.jpeg_within_limits(b"\xff\xd8\xff\xc0")
