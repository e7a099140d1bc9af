"""Image decoding (eagerly and inside Dataset.map) and the never-crashing file pipeline."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.kit.met_tree import write_image
from tfmet.data import images

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (12, 17, 1), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (5, 6), dtype=np.uint16)


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pil_rgb(data):
    """The Met reference's decode: PIL, first frame, convert("RGB")."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def _gif():
    frames = [Image.fromarray(RGB).convert("P"), Image.fromarray(255 - RGB).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


# name -> (encoded bytes, expected float32 [H, W, 3]), each expectation computed independently.
def _cases():
    jpeg = _encode(Image.fromarray(RGB), "JPEG", quality=90)
    cmyk = _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95)
    gray_jpeg = _encode(Image.fromarray(RGB).convert("L"), "JPEG")
    gif = _gif()
    gray = RGB[..., 0]
    return {
        "jpeg": (jpeg, _pil_rgb(jpeg)),
        "cmyk_jpeg": (cmyk, _pil_rgb(cmyk)),
        "gray_jpeg": (gray_jpeg, _pil_rgb(gray_jpeg)),
        "png": (_encode(Image.fromarray(RGB), "PNG"), RGB.astype(np.float32)),
        "rgba_png": (
            _encode(Image.fromarray(np.concatenate([RGB, ALPHA], -1)), "PNG"),
            RGB.astype(np.float32),
        ),
        "gray_png": (
            _encode(Image.fromarray(gray), "PNG"),
            np.repeat(gray[..., None], 3, -1).astype(np.float32),
        ),
        "png16": (
            _encode(Image.fromarray(GRAY16), "PNG"),
            np.repeat((GRAY16.astype(np.float64) / 257.0)[..., None], 3, -1).astype(np.float32),
        ),
        "gif_first_frame": (
            gif,
            np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"), np.float32),
        ),
        "bmp": (_encode(Image.fromarray(RGB), "BMP"), RGB.astype(np.float32)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_eagerly(name):
    data, expected = CASES[name]
    image = images.decode_image(data).numpy()
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-4, rtol=0)


def test_decode_inside_dataset_map():
    names = sorted(CASES)
    dataset = tf.data.Dataset.from_tensor_slices([CASES[n][0] for n in names]).map(
        images.decode_image
    )
    for name, image in zip(names, dataset, strict=True):
        assert image.shape[-1] == 3
        np.testing.assert_allclose(image.numpy(), CASES[name][1], atol=1e-4, rtol=0, err_msg=name)


def test_jpeg_matches_pil_bit_for_bit_on_a_larger_image():
    smooth = np.cumsum(RNG.integers(0, 9, (67, 91, 3)), axis=1).astype(np.uint8)
    data = _encode(Image.fromarray(smooth), "JPEG", quality=75, subsampling=2)
    np.testing.assert_array_equal(images.decode_image(data).numpy(), _pil_rgb(data))


def test_decode_rejects_non_images():
    with pytest.raises(tf.errors.InvalidArgumentError):
        images.decode_image(b"this is not an image")


def test_cap_max_side_eagerly_and_in_map():
    image = np.full((40, 80, 3), 7.0, np.float32)
    image[:, :40] = 200.0
    capped = images.cap_max_side(image, 20).numpy()
    assert capped.shape == (10, 20, 3)
    # the left half stays 200 and the right half 7 away from the boundary (antialias blends it)
    np.testing.assert_allclose(capped[:, :8], 200.0, atol=1e-3)
    np.testing.assert_allclose(capped[:, 12:], 7.0, atol=1e-3)
    small = np.ones((5, 9, 3), np.float32)
    np.testing.assert_array_equal(images.cap_max_side(small, 20).numpy(), small)
    mapped = next(
        iter(tf.data.Dataset.from_tensors(image).map(lambda x: images.cap_max_side(x, 20)))
    )
    np.testing.assert_allclose(mapped.numpy(), capped, atol=1e-5)
    with pytest.raises(ValueError, match="max_side"):
        images.cap_max_side(image, 0)


def test_load_images_survives_bad_files(tmp_path):
    good_jpeg = write_image(str(tmp_path / "good.jpg"), RGB)
    good_png = str(tmp_path / "rgba.png")
    (tmp_path / "rgba.png").write_bytes(CASES["rgba_png"][0])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a picture\n")
    truncated = open(good_jpeg, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    paths = [
        good_jpeg,
        str(tmp_path / "zero.jpg"),
        str(tmp_path / "text.jpg"),
        good_png,
        str(tmp_path / "truncated.jpg"),
        str(tmp_path / "missing.jpg"),
    ]
    rows = list(images.load_images(paths, num_parallel_calls=2).as_numpy_iterator())
    assert [int(r["index"]) for r in rows] == list(range(6))
    assert [bool(r["ok"]) for r in rows] == [True, False, False, True, False, False]
    errors = [r["error"].decode() for r in rows]
    assert errors[0] == "" and errors[3] == ""
    assert "empty" in errors[1]
    assert "Unknown image file format" in errors[2]
    assert "JPEG" in errors[4]
    assert "FileNotFoundError" in errors[5] and "No such file" in errors[5]
    assert not any("{{" in e or "[Op:" in e for e in errors)
    np.testing.assert_array_equal(rows[0]["image"], _pil_rgb(open(good_jpeg, "rb").read()))
    np.testing.assert_array_equal(rows[3]["image"], RGB.astype(np.float32))
    assert rows[1]["image"].shape == (0, 0, 3)


def test_load_images_max_side_and_custom_indices(tmp_path):
    path = write_image(str(tmp_path / "a.png"), np.zeros((30, 60, 3), np.uint8), format="PNG")
    rows = list(images.load_images([path, path], max_side=15, indices=[7, 9]).as_numpy_iterator())
    assert [int(r["index"]) for r in rows] == [7, 9]
    assert rows[0]["image"].shape == (8, 15, 3)  # round(30 * 15 / 60) = round(7.5) = 8
