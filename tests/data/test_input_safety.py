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
from tfmet.data import image_headers, images
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
        assert [int(v) for v in image_headers.declared_size(data)] == [13, 21], name
    mapped = tf.data.Dataset.from_tensor_slices(list(ENCODED.values())).map(
        lambda data: tf.stack(image_headers.declared_size(data))
    )
    assert [row.tolist() for row in mapped.as_numpy_iterator()] == [[13, 21]] * len(ENCODED)


def test_declared_size_of_hand_made_headers():
    webp = bombs.webp_vp8x_header(16384, 300)
    assert [int(v) for v in image_headers.declared_size(webp)] == [300, 16384]
    for name, data in _bomb_headers().items():
        assert [int(v) for v in image_headers.declared_size(data)] == [20000, 20000], name
    for data in (b"", b"x", b"not an image at all, just text"):
        assert [int(v) for v in image_headers.declared_size(data)] == [-1, -1]


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
    with pytest.raises(images.ImageRefused, match="over the budget of 256.0 MiB"):
        images.decode_image(_bomb_headers()["gif"], max_pixels=None)  # the bytes still count
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:  # the decoder's own error
        images.decode_image(_bomb_headers()["gif"], max_pixels=None, max_decoded_bytes=None)
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
    # max_bytes: the larger of the two good images is one byte over the limit.
    limit = max(len(ENCODED["jpeg"]), len(ENCODED["png"])) - 1
    small = DescriptorModule(embedder, max_bytes=limit).describe_bytes(tf.constant(payload))
    expected = [len(ENCODED["jpeg"]) <= limit, False, False, len(ENCODED["png"]) <= limit]
    assert small["valid"].numpy().tolist() == expected and sum(expected) == 1

    database = np.eye(8, dtype=np.float32)
    recognizer = RecognizerModule(embedder, database, np.arange(8), k=2, tau=10.0)
    export = save_module(recognizer, tmp_path / "rec", recognizer.signatures(), {"kind": "x"})
    served = tf.saved_model.load(export).signatures["serving_default"]
    out = served(image_bytes=tf.constant(payload))
    assert out["valid"].numpy().tolist() == [True, False, False, True]
    assert out["met_id"].numpy().tolist()[1:3] == [-1, -1]


# --- Paths that leave their root through links (Met ground truth) ---------------------------


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def met_root(tmp_path):
    """<tmp>/met/images/MET/1/0.jpg (a file), and <tmp>/outside/secret.jpg beside the root."""
    image_root = tmp_path / "met"
    _touch(str(image_root / "images" / "MET" / "1" / "0.jpg"))
    _touch(str(tmp_path / "outside" / "secret.jpg"))
    return image_root


def test_met_refuses_a_file_link_out_of_the_image_root(met_root, tmp_path):
    from tfmet.data import met

    os.symlink(tmp_path / "outside" / "secret.jpg", met_root / "images" / "MET" / "1" / "1.jpg")
    with pytest.raises(ValueError) as raised:
        met.resolve_image_path(met_root, "MET/1/1.jpg", "valset.json", 4)
    message = str(raised.value)
    assert message.startswith("valset.json: entry 4: 'MET/1/1.jpg' resolves to ")
    assert str(tmp_path / "outside" / "secret.jpg") in message
    assert "outside the image root" in message


def test_met_refuses_a_folder_link_and_dev_zero(met_root, tmp_path):
    from tfmet.data import met

    os.symlink(tmp_path / "outside", met_root / "images" / "MET" / "2")
    with pytest.raises(ValueError, match=r"'MET/2/secret.jpg' resolves to .*outside"):
        met.resolve_image_path(met_root, "MET/2/secret.jpg")
    os.symlink("/dev/zero", met_root / "images" / "MET" / "1" / "zero.jpg")
    with pytest.raises(ValueError, match=r"'MET/1/zero.jpg' resolves to /dev/zero"):
        met.resolve_image_path(met_root, "MET/1/zero.jpg")


def test_met_accepts_links_that_stay_inside_and_a_linked_images_folder(met_root, tmp_path):
    from tfmet.data import met

    inside = met_root / "images" / "MET" / "1" / "link.jpg"
    os.symlink("0.jpg", inside)
    assert met.resolve_image_path(met_root, "MET/1/link.jpg") == str(inside)
    linked_root = tmp_path / "linked"
    os.mkdir(linked_root)
    os.symlink(met_root / "images", linked_root / "images")  # e.g. images on another disk
    assert met.resolve_image_path(linked_root, "MET/1/0.jpg") == str(
        linked_root / "images" / "MET" / "1" / "0.jpg"
    )


def test_met_image_paths_name_the_ground_truth_file_and_entry(tmp_path):
    from tests.kit.met_tree import write_met_tree
    from tfmet.data import met

    tree = write_met_tree(tmp_path / "tree", num_exhibits=2, images_per_exhibit=1)
    outside = _touch(str(tmp_path / "outside.jpg"))
    victim = tree.image_path(tree.val[1]["path"])
    os.remove(victim)
    os.symlink(outside, victim)
    split = met.load_split(tree.info_dir, "val")
    with pytest.raises(ValueError) as raised:
        met.image_paths(split, tree.image_root)
    assert str(raised.value).startswith(
        f"{split.source}: entry 1: {tree.val[1]['path']!r} resolves to {outside}"
    )
    assert len(met.image_paths(met.load_split(tree.info_dir, "test"), tree.image_root)) == len(
        tree.test
    )


@pytest.mark.parametrize("spelling", ["MET/1/./0.jpg", "MET//1/0.jpg", "MET/x/../1/0.jpg"])
def test_met_duplicates_compare_normalised_paths(spelling):
    from tfmet.data import met

    entries = [{"path": "MET/1/0.jpg", "MET_id": 1}, {"path": spelling, "MET_id": 1}]
    with pytest.raises(ValueError) as raised:
        met.parse_entries(entries, "val", "valset.json")
    assert str(raised.value) == (
        f"valset.json: entry 1 repeats path {spelling!r} of entry 0 ('MET/1/0.jpg')"
    )


# --- Paths that leave their root (style datasets) -------------------------------------------


@pytest.fixture
def style_root(tmp_path):
    """<tmp>/style/Baroque/artist/a.jpg, Cubism/b.jpg, and <tmp>/outside/{secret.jpg, artist/}."""
    root = tmp_path / "style"
    _touch(str(root / "Baroque" / "artist" / "a.jpg"))
    _touch(str(root / "Cubism" / "b.jpg"))
    _touch(str(tmp_path / "outside" / "secret.jpg"))
    _touch(str(tmp_path / "outside" / "artist" / "c.jpg"))
    return root


def test_pandora_refuses_linked_folders_and_files_out_of_the_root(style_root, tmp_path):
    from tfmet.data import style_datasets

    assert len(style_datasets.load_pandora18k(str(style_root))) == 2
    os.symlink(tmp_path / "outside" / "artist", style_root / "Baroque" / "other")
    with pytest.raises(ValueError) as raised:
        style_datasets.load_pandora18k(str(style_root))
    assert str(raised.value).startswith(
        f"Pandora18k root {style_root}: 'Baroque/other/c.jpg' resolves to "
        f"{tmp_path / 'outside' / 'artist' / 'c.jpg'}"
    )
    os.remove(style_root / "Baroque" / "other")
    os.symlink(tmp_path / "outside" / "secret.jpg", style_root / "Baroque" / "artist" / "s.jpg")
    with pytest.raises(ValueError, match=r"'Baroque/artist/s.jpg' resolves to .*outside the"):
        style_datasets.load_pandora18k(str(style_root))


def test_style_folders_refuse_a_link_to_dev_zero(style_root):
    from tfmet.data import style_datasets

    assert len(style_datasets.load_folders(str(style_root))) == 2
    os.symlink("/dev/zero", style_root / "Baroque" / "artist" / "zero.jpg")
    with pytest.raises(ValueError) as raised:
        style_datasets.load_folders(str(style_root))
    assert str(raised.value).startswith(
        f"style folder root {style_root}: 'Baroque/artist/zero.jpg' resolves to /dev/zero"
    )


def _lists(root, train, test=None):
    (root / "train.txt").write_text("".join(f"{line}\n" for line in train))
    if test is not None:
        (root / "test.txt").write_text("".join(f"{line}\n" for line in test))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("../outside/secret.jpg 0", "'path' '../outside/secret.jpg' escapes the image root"),
        ("/etc/hostname 0", "'path' '/etc/hostname' is absolute"),
        ("Cubism/../../outside/secret.jpg 0", "escapes the image root"),
        ("link/secret.jpg 0", "'link/secret.jpg' resolves to "),
    ],
)
def test_wikipaintings_lists_refuse_escaping_entries(style_root, tmp_path, line, problem):
    from tfmet.data import style_datasets

    os.symlink(tmp_path / "outside", style_root / "link")
    _lists(style_root, ["Cubism/b.jpg 0", line])
    with pytest.raises(ValueError) as raised:
        style_datasets.load_wikipaintings_lists(str(style_root))
    assert str(raised.value).startswith(f"{style_root / 'train.txt'}:2: ")
    assert problem in str(raised.value)


def test_wikipaintings_lists_normalise_paths_and_refuse_duplicates(style_root):
    from tfmet.data import style_datasets

    _lists(style_root, ["Cubism/./b.jpg 0"], ["Baroque//artist/a.jpg 1"])
    records = style_datasets.load_wikipaintings_lists(str(style_root))
    assert records.paths == ["Cubism/b.jpg", "Baroque/artist/a.jpg"]
    _lists(style_root, ["Cubism/b.jpg 0"], ["Baroque/artist/a.jpg 1", "x/../Cubism/b.jpg 0"])
    with pytest.raises(ValueError) as raised:
        style_datasets.load_wikipaintings_lists(str(style_root))
    assert str(raised.value) == (
        f"{style_root / 'test.txt'}:2: 'x/../Cubism/b.jpg' names the same image as "
        f"'Cubism/b.jpg' ({style_root / 'train.txt'}:1)"
    )


def test_style_csv_refuses_escaping_entries(style_root, tmp_path):
    from tfmet.data import style_datasets

    os.symlink(tmp_path / "outside" / "secret.jpg", style_root / "Cubism" / "s.jpg")
    csv_path = style_root / "labels.csv"
    csv_path.write_text("path,style\nCubism/b.jpg,Cubism\nCubism/s.jpg,Cubism\n")
    with pytest.raises(ValueError) as raised:
        style_datasets.load_csv(str(csv_path))
    assert str(raised.value).startswith(
        f"{csv_path}:3: 'Cubism/s.jpg' resolves to {tmp_path / 'outside' / 'secret.jpg'}"
    )
    csv_path.write_text("path,style\nCubism/b.jpg,Cubism\n../outside/secret.jpg,Cubism\n")
    with pytest.raises(ValueError, match=r"labels.csv:3: 'path' '../outside/secret.jpg' escapes"):
        style_datasets.load_csv(str(csv_path))
    csv_path.write_text("path,style\nCubism/b.jpg,Cubism\n./Cubism/b.jpg,Cubism\n")
    with pytest.raises(ValueError, match=r"labels.csv:3: './Cubism/b.jpg' names the same image"):
        style_datasets.load_csv(str(csv_path))


# --- Beam reads local files as the single-machine extraction does ---------------------------


def test_beam_read_image_bytes_refuses_special_files(tmp_path, watchdog):
    pytest.importorskip("apache_beam")
    from tfmet.beam import transforms

    good = _touch(str(tmp_path / "good.png"), ENCODED["png"])
    reader = transforms.ReadImageBytes()
    for path, reason in [(good, None), *_special_files(tmp_path).values()]:
        key = transforms.RowKey("val", 0, 0, 1, 0, os.path.basename(path), path)
        (out,) = list(reader.process(key))
        if reason is None:
            assert out == (key, ENCODED["png"])
        else:
            assert out.tag == transforms.UNREADABLE and out.value[1].reason == reason


# --- GIF: frames larger than the screen, and many frames ------------------------------------


def test_gif_frames_are_counted_not_just_the_logical_screen():
    # giflib holds every frame at its own size: a 10x10 screen may carry a 20000x20000 frame.
    big_frame = bombs.gif_frames((10, 10), [(20000, 20000)])
    assert [int(v) for v in image_headers.declared_pixels(big_frame)] == [
        20000,
        20000,
        1,
        400_000_000,
    ]
    with pytest.raises(images.ImageRefused) as raised:
        images.decode_image(big_frame)
    assert images.error_reason(raised.value) == BOMB_REASON
    animation = bombs.gif_frames((3000, 3000), [(3000, 3000)] * 1000)  # 15 KB, 9 Gpx in all
    assert len(animation) < 20_000
    expected = (
        "image declares 1000 frames of up to 3000x3000 = 9000.0 Mpx in all, over the limit of "
        "89.5 Mpx"
    )
    with pytest.raises(images.ImageRefused) as raised:
        images.decode_image(animation)
    assert images.error_reason(raised.value) == expected
    mapped = tf.data.Dataset.from_tensors(animation).map(images.decode_image)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        next(iter(mapped))
    assert images.error_reason(raised.value) == expected


def test_gif_frames_of_a_real_animation():
    frames = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (60, 80), np.uint8), "L")
        for i in range(12)
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert [int(v) for v in image_headers.declared_pixels(data)] == [60, 80, 12, 12 * 4800]
    assert images.decode_image(data).shape == (60, 80, 3)  # the first frame
    with pytest.raises(images.ImageRefused) as raised:
        images.decode_image(data, max_pixels=50_000)
    assert images.error_reason(raised.value) == (
        "image declares 12 frames of up to 80x60 = 57600 px in all, over the limit of 50000 px"
    )
