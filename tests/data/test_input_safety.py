"""Inputs that declare more than tfmet will hold, and paths that leave their root (issue #14).

Every case is a tiny file the test makes: a ~390 KB PNG declaring 20000 x 20000 (written by
`tests.kit.bombs` without holding its pixels), headers of other formats declaring huge sizes, a
FIFO, a link to /dev/zero, a directory named like an image, links out of an image root. Each
reader must refuse them before reading or decoding, with a reason naming the problem.
"""

import faulthandler
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.kit import bombs, tiny_backbone
from tfmet.backbones import IMAGENET_TORCH
from tfmet.data import images
from tfmet.data.limits import DEFAULT_MAX_PIXELS

BOMB_REASON = "image declares 20000x20000 = 400.0 Mpx, over the limit of 89.5 Mpx"
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (13, 21, 3), dtype=np.uint8)


def _encode(format, mode="RGB", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).convert(mode).save(buffer, format, **kwargs)
    return buffer.getvalue()


ENCODED = {
    "jpeg": _encode("JPEG"),
    "png": _encode("PNG"),
    "png_grey": _encode("PNG", "L"),
    "gif": _encode("GIF", "P"),
    "bmp": _encode("BMP"),
    "webp_lossy": _encode("WEBP", quality=80),
    "webp_lossless": _encode("WEBP", lossless=True),
}


def _bomb_headers():
    return {
        "gif": bombs.gif_header(20000, 20000),
        "bmp": bombs.bmp_header(20000, 20000),
        "bmp_top_down": bombs.bmp_header(20000, -20000),
        "jpeg": bombs.jpeg_declaring(ENCODED["jpeg"], 20000, 20000),
        "png": _png_declaring(20000, 20000),
    }


def _png_declaring(width, height):
    data = bytearray(ENCODED["png"])
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)  # the IHDR CRC no longer matches: refused before anything checks it


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bomb") / "bomb.png")
    size = bombs.write_png_bomb(path, 20000)
    assert size < 500_000
    return path


@pytest.fixture
def watchdog():
    """Kills the test run with tracebacks if a read blocks (a FIFO opened for a blocking read)."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- Declared sizes -------------------------------------------------------------------------


def test_declared_size_of_every_format_eagerly_and_in_map():
    for name, data in ENCODED.items():
        assert [int(v) for v in images.declared_size(data)] == [13, 21], name
    mapped = tf.data.Dataset.from_tensor_slices(list(ENCODED.values())).map(
        lambda data: tf.stack(images.declared_size(data))
    )
    assert [row.tolist() for row in mapped.as_numpy_iterator()] == [[13, 21]] * len(ENCODED)


def test_declared_size_of_hand_made_headers():
    webp = bombs.webp_vp8x_header(16384, 300)
    assert [int(v) for v in images.declared_size(webp)] == [300, 16384]
    for name, data in _bomb_headers().items():
        assert [int(v) for v in images.declared_size(data)] == [20000, 20000], name
    for data in (b"", b"x", b"not an image at all, just text"):
        assert [int(v) for v in images.declared_size(data)] == [-1, -1]


# --- Decoding refuses what declares too much ------------------------------------------------


def test_decode_refuses_bombs_before_decoding_eagerly(bomb):
    with open(bomb, "rb") as f:
        data = f.read()
    with pytest.raises(images.ImageRefused) as raised:
        images.decode_image(data)
    assert images.error_reason(raised.value) == BOMB_REASON
    for header in _bomb_headers().values():
        with pytest.raises(images.ImageRefused, match="20000x20000 = 400.0 Mpx"):
            images.decode_image(header)
    with pytest.raises(images.ImageRefused, match="16384x16384 = 268.4 Mpx"):
        images.decode_image(bombs.webp_vp8x_header(16384, 16384))


def test_decode_refuses_bombs_inside_dataset_map(bomb):
    with open(bomb, "rb") as f:
        data = f.read()
    for payload in [data, *_bomb_headers().values()]:
        dataset = tf.data.Dataset.from_tensors(payload).map(images.decode_image)
        with pytest.raises(tf.errors.InvalidArgumentError) as raised:
            next(iter(dataset))
        assert images.error_reason(raised.value).startswith("image declares 20000x20000")
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        next(iter(tf.data.Dataset.from_tensors(data).map(images.decode_image)))
    assert images.error_reason(raised.value) == BOMB_REASON


def test_max_pixels_is_a_parameter_and_none_lifts_it():
    data = ENCODED["png"]  # 21 x 13 = 273 pixels
    assert images.decode_image(data, max_pixels=273).shape == (13, 21, 3)
    with pytest.raises(images.ImageRefused) as raised:
        images.decode_image(data, max_pixels=272)
    assert images.error_reason(raised.value) == (
        "image declares 21x13 = 273 px, over the limit of 272 px"
    )
    mapped = tf.data.Dataset.from_tensors(data).map(lambda b: images.decode_image(b, 272))
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        next(iter(mapped))
    assert images.error_reason(raised.value) == (
        "image declares 21x13 = 273 px, over the limit of 272 px"
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:  # the decoder's own error
        images.decode_image(_bomb_headers()["gif"], max_pixels=None)
    assert not isinstance(raised.value, images.ImageRefused)
    with pytest.raises(ValueError, match="max_pixels"):
        images.decode_image(data, max_pixels=0)
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


# --- Reading files: only regular files, at most max_bytes -----------------------------------


def _special_files(tmp_path):
    """{name: (path, expected reason)} of files no reader may read."""
    fifo = str(tmp_path / "fifo.jpg")
    os.mkfifo(fifo)
    zero = str(tmp_path / "zero.jpg")
    os.symlink("/dev/zero", zero)
    directory = str(tmp_path / "folder.jpg")
    os.mkdir(directory)
    return {
        "fifo": (fifo, "not a regular file (a FIFO)"),
        "dev_zero": (zero, "not a regular file (a character device)"),
        "directory": (directory, "not a regular file (a directory)"),
    }


def test_read_image_refuses_special_files_without_blocking(tmp_path, watchdog):
    for name, (path, reason) in _special_files(tmp_path).items():
        image, got = images.read_image(path)
        assert image is None and got == reason, name
        with pytest.raises(images.ImageRefused, match="not a regular file"):
            images.read_image_bytes(path)


def test_read_image_byte_cap(tmp_path):
    path = str(tmp_path / "a.png")
    with open(path, "wb") as f:
        f.write(ENCODED["png"])
    size = len(ENCODED["png"])
    assert images.read_image(path, max_bytes=size)[0].shape == (13, 21, 3)
    image, reason = images.read_image(path, max_bytes=size - 1)
    assert image is None
    assert reason == f"file holds {size:,} bytes, over the limit of {size - 1:,} bytes"
    with pytest.raises(ValueError, match="max_bytes"):
        images.read_image_bytes(path, max_bytes=0)


def test_load_images_gives_invalid_rows_with_reasons(tmp_path, bomb, watchdog):
    good = str(tmp_path / "good.png")
    with open(good, "wb") as f:
        f.write(ENCODED["png"])
    special = _special_files(tmp_path)
    paths = [good, bomb, *[path for path, _ in special.values()], good]
    rows = list(images.load_images(paths, num_parallel_calls=2).as_numpy_iterator())
    assert [bool(r["ok"]) for r in rows] == [True, False, False, False, False, True]
    reasons = [r["error"].decode() for r in rows]
    assert reasons[1] == BOMB_REASON
    assert reasons[2:5] == [reason for _, reason in special.values()]
    assert rows[1]["image"].shape == (0, 0, 3)
    capped = list(images.load_images([good], max_pixels=100, max_bytes=10).as_numpy_iterator())
    assert "over the limit of 10 bytes" in capped[0]["error"].decode()
    capped = list(images.load_images([good], max_pixels=100).as_numpy_iterator())
    assert capped[0]["error"].decode() == "image declares 21x13 = 273 px, over the limit of 100 px"


# --- Style prediction -----------------------------------------------------------------------


def test_style_read_images_reports_refusals(tmp_path, bomb, watchdog):
    from tfmet.training.style import predict

    good = str(tmp_path / "good.jpg")
    with open(good, "wb") as f:
        f.write(ENCODED["jpeg"])
    fifo, fifo_reason = _special_files(tmp_path)["fifo"]
    stacked, kept, errors = predict.read_images([good, bomb, fifo], 8)
    assert stacked.shape == (1, 8, 8, 3) and kept == [good]
    assert errors == [(bomb, BOMB_REASON), (fifo, fifo_reason)]
    _, kept, errors = predict.read_images([good], 8, max_pixels=100)
    assert kept == [] and "over the limit of 100 px" in errors[0][1]


# --- Serving signatures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    from tfmet.descriptors import Embedder

    return Embedder(tiny_backbone(channels=8, seed=3), preprocessing=IMAGENET_TORCH)


def test_descriptor_and_recognizer_signatures_mark_bombs_invalid(tmp_path, bomb, embedder):
    from tfmet.export import DescriptorModule, RecognizerModule, save_module

    with open(bomb, "rb") as f:
        payload = [ENCODED["jpeg"], f.read(), _bomb_headers()["gif"], ENCODED["png"]]
    descriptor = DescriptorModule(embedder)
    out = descriptor.describe_bytes(tf.constant(payload))
    assert out["valid"].numpy().tolist() == [True, False, False, True]
    np.testing.assert_array_equal(out["descriptor"].numpy()[1:3], 0.0)
    strict = DescriptorModule(embedder, max_pixels=200)
    assert strict.describe_bytes(tf.constant(payload))["valid"].numpy().tolist() == [False] * 4

    database = np.eye(8, dtype=np.float32)
    recognizer = RecognizerModule(embedder, database, np.arange(8), k=2, tau=10.0)
    export = save_module(recognizer, tmp_path / "rec", recognizer.signatures(), {"kind": "x"})
    served = tf.saved_model.load(export).signatures["serving_default"]
    out = served(image_bytes=tf.constant(payload))
    assert out["valid"].numpy().tolist() == [True, False, False, True]
    assert out["met_id"].numpy().tolist()[1:3] == [-1, -1]
