"""Local features through the chunked extraction into the store: resumable, exact, checked."""

import os

import numpy as np
import pytest
from PIL import Image

from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store
from tfmet.data import met
from tfmet.descriptors import chunk_files, extraction
from tfmet.descriptors import spec as spec_lib
from tfmet.descriptors.local import LocalSpec

LOCAL = LocalSpec(num=12, dim=16)


@pytest.fixture(scope="module")
def built():
    import keras

    keras.utils.set_random_seed(0)
    return spec_lib.build_extractor("resnet_tiny", seed=0, chunk_size=3, local=LOCAL)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"), num_exhibits=4, images_per_exhibit=2)


def _extract(built, tree, out, **kwargs):
    extractor, spec = built
    splits = extraction.load_met_splits(tree.info_dir, ("train",))
    return extraction.extract_met(extractor, spec, splits, tree.image_root, out, progress=False,
                                  **kwargs)  # fmt: skip


def test_store_holds_each_images_local_features(built, tree, tmp_path):
    extractor, spec = built
    _extract(built, tree, tmp_path / "out")
    manifest = store.read_manifest(tmp_path / "out", "train")
    assert manifest["local_features"] == {"num": 12, "dim": 16, "seed": 0, "local_dim": 16}
    local = store.read_local(tmp_path / "out", "train")
    descriptors = store.read_store(tmp_path / "out", "train").descriptors
    assert local.descriptors.shape == (8, 12, 16) and local.descriptors.dtype == np.float16
    split = extraction.load_met_splits(tree.info_dir, ("train",))[0]
    for row, path in enumerate(met.image_paths(split, tree.image_root)):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), np.float32)[None]
        want, points, rows, scores = (t.numpy()[0] for t in extractor.extract_local(pixels))
        np.testing.assert_allclose(descriptors[row], want, atol=1e-6)
        got_points, got_rows, got_scores = local.image(row)
        n = len(scores)
        assert int(local.counts[row]) == n == min(12, len(got_scores))
        np.testing.assert_allclose(got_points, points, atol=1e-3)  # float16
        np.testing.assert_allclose(got_rows, rows, atol=2e-3)
        np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
        assert not local.descriptors[row, n:].any()  # padding stays zero


def test_a_resumed_run_keeps_the_local_features_of_finished_chunks(built, tree, tmp_path):
    out = tmp_path / "out"
    _extract(built, tree, out, keep_chunks=True)
    first = store.read_local(out, "train", mmap=False)
    chunks = chunk_files.ChunkDirectory(out, "train")
    os.remove(chunks.chunk_path(1))  # as if killed before the second chunk
    for name in ("descriptors", "manifest"):
        os.remove(store.array_path(out, "train") if name == "descriptors"
                  else store.manifest_path(out, "train"))  # fmt: skip
    report = _extract(built, tree, out)[0]
    assert (report.chunks_skipped, report.chunks_computed) == (2, 1)
    again = store.read_local(out, "train", mmap=False)
    np.testing.assert_array_equal(again.descriptors, first.descriptors)
    np.testing.assert_array_equal(again.counts, first.counts)


def test_local_settings_are_part_of_the_spec(built, tree, tmp_path):
    out = tmp_path / "out"
    _extract(built, tree, out)
    extractor, spec = spec_lib.build_extractor(
        "resnet_tiny", seed=0, chunk_size=3, local=LocalSpec(num=6, dim=16)
    )
    with pytest.raises(ValueError, match="local_features"):
        extraction.extract_met(
            extractor, spec, extraction.load_met_splits(tree.info_dir, ("train",)),
            tree.image_root, out, progress=False,
        )  # fmt: skip


def test_a_store_without_local_features_says_how_to_get_them(tree, tmp_path):
    store.write_store(tmp_path, "train", np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"no local features \(extract with --local_features N\)"):
        store.read_local(tmp_path, "train")


def test_a_truncated_local_array_is_named(built, tree, tmp_path):
    out = tmp_path / "out"
    _extract(built, tree, out)
    path = store.local_path(out, "train", "points")
    np.save(path, np.zeros((3, 12, 2), np.float16))
    with pytest.raises(ValueError, match=r"_local_points.npy: array is float16 \(3, 12, 2\)"):
        store.read_local(out, "train")


def test_a_local_block_of_the_wrong_length_is_refused(tmp_path):
    block = {
        "descriptors": np.zeros((2, 3, 4), np.float16),
        "points": np.zeros((1, 3, 2), np.float16),  # one row short of the block's 2
        "scores": np.zeros((2, 3), np.float32),
        "counts": np.zeros(2, np.int16),
    }
    with pytest.raises(ValueError, match=r"local points block at row 0 has shape \(1, 3, 2\)"):
        store.write_local_rows(tmp_path, "train", 2, 3, 4, [(0, block)])
    assert not list(tmp_path.glob("train_local_*.npy"))  # nothing half-written
