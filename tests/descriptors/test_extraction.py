"""Chunked extraction: equals the Embedder image by image, shards merge to the unsharded result,
interrupted runs resume without recomputing, bad files are recorded and never stop a run."""

import hashlib
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.kit import tiny_backbone, tiny_spec
from tests.kit.met_tree import exhibit_view, write_image, write_met_tree
from tfmet.backbones import IMAGENET_TORCH, batchnorm
from tfmet.data import descriptor_store as store
from tfmet.data import met
from tfmet.descriptors import (
    MET_SCALES,
    DescriptorExtractor,
    Embedder,
    chunk_files,
    extraction,
)
from tfmet.descriptors import spec as spec_lib

CHUNK = 3


@pytest.fixture(scope="module")
def extractor():
    return DescriptorExtractor(Embedder(tiny_backbone(seed=3), preprocessing=IMAGENET_TORCH))


def _spec(**overrides):
    return tiny_spec(**(dict(chunk_size=CHUNK) | overrides))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"), num_exhibits=4, images_per_exhibit=2)


def _pil_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float32)


def _one_by_one(extractor, images):
    return np.stack([extractor(image[None]).numpy()[0] for image in images])


def _extract(extractor, tree, out, splits=("train", "val"), **kwargs):
    kwargs.setdefault("progress", False)
    splits = extraction.load_met_splits(tree.info_dir, splits)
    return extraction.extract_met(extractor, _spec(), splits, tree.image_root, out, **kwargs)


def test_chunk_bounds_and_shards():
    assert chunk_files.chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_files.chunk_bounds(0, 3) == []
    assert chunk_files.shard_chunks(7, 3, 0) == [0, 3, 6]
    assert chunk_files.shard_chunks(7, 3, 2) == [2, 5]
    with pytest.raises(ValueError, match="shard_index"):
        chunk_files.shard_chunks(7, 2, 2)


def test_weights_fingerprint(tmp_path):
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"some weights")
    expected = "sha256:" + hashlib.sha256(b"some weights").hexdigest()
    assert spec_lib.weights_fingerprint(str(path)) == expected
    assert spec_lib.weights_fingerprint(None, seed=4) == "random:seed=4"


@pytest.mark.parametrize("batch_images", [1, 3])
def test_store_equals_embedder_image_by_image(extractor, tree, tmp_path, batch_images):
    reports = _extract(extractor, tree, tmp_path, batch_images=batch_images)
    assert [r.merged for r in reports] == [True, True]
    assert not os.path.exists(tmp_path / "chunks")  # merged chunks are removed by default
    for split in ("train", "val"):
        entries = tree.entries(split)
        expected = _one_by_one(extractor, [_pil_rgb(tree.image_path(e["path"])) for e in entries])
        loaded = store.read_store(tmp_path, split)
        assert loaded.count == len(entries) and loaded.dim == 8
        np.testing.assert_allclose(loaded.descriptors, expected, atol=1e-5, rtol=0)
        assert loaded.valid.all() and loaded.manifest["errors"] == []
        manifest = loaded.manifest
        assert manifest["paths"] == [e["path"] for e in entries]
        key = "id" if split == "train" else "MET_id"
        assert manifest["labels"] == [e.get(key, -1) for e in entries]
        assert manifest["backbone"] == "tiny" and manifest["weights_sha256"] == "random:seed=3"
        assert manifest["scales"] == list(MET_SCALES) and manifest["chunk_size"] == CHUNK


def test_sharded_and_merged_equals_unsharded(extractor, tree, tmp_path):
    _extract(extractor, tree, tmp_path / "whole")
    sharded = tmp_path / "sharded"
    for shard in (2, 0, 1):
        reports = _extract(extractor, tree, sharded, num_shards=3, shard_index=shard)
        assert not any(r.merged for r in reports)
        # train has 8 rows = chunks 0,1,2 (one per shard); val has 7 rows, also 3 chunks
        assert [r.chunks_computed for r in reports] == [1, 1]
    with pytest.raises(FileNotFoundError, match="no descriptor store"):
        store.read_store(sharded, "train")  # shards never merge on their own
    for split in ("train", "val"):
        chunk_files.merge_split(sharded, split, keep_chunks=False)
        whole = store.read_store(tmp_path / "whole", split)
        merged = store.read_store(sharded, split)
        np.testing.assert_array_equal(merged.descriptors, whole.descriptors)
        assert merged.manifest == whole.manifest


def test_merge_names_missing_chunks(extractor, tree, tmp_path):
    _extract(extractor, tree, tmp_path, splits=("val",), num_shards=3, shard_index=1)
    with pytest.raises(FileNotFoundError, match=r"2 of 3 chunks missing \(0, 2\)"):
        chunk_files.merge_split(tmp_path, "val")


class _Crash(RuntimeError):
    pass


class _CountingExtractor:
    """Counts images; raises after `crash_after` model calls to simulate a crash."""

    def __init__(self, extractor, crash_after=None):
        self.extractor = extractor
        self.crash_after = crash_after
        self.images = 0

    def __call__(self, batch):
        if self.crash_after is not None and self.images >= self.crash_after:
            raise _Crash("simulated crash")
        self.images += int(batch.shape[0])
        return self.extractor(batch)


def test_interrupted_run_resumes_from_finished_chunks(extractor, tree, tmp_path):
    _extract(extractor, tree, tmp_path / "reference", splits=("train",))
    out = tmp_path / "resumed"
    crashing = _CountingExtractor(extractor, crash_after=7)  # dies inside chunk 2 (rows 6-7)
    with pytest.raises(_Crash):
        _extract(crashing, tree, out, splits=("train",))
    chunk_dir = chunk_files.ChunkDirectory(out, "train")
    assert chunk_dir.finished(range(3)) == [0, 1]
    mtimes = [os.stat(chunk_dir.chunk_path(j)).st_mtime_ns for j in (0, 1)]

    counting = _CountingExtractor(extractor)
    (report,) = _extract(counting, tree, out, splits=("train",), keep_chunks=True)
    assert (report.chunks_skipped, report.chunks_computed, counting.images) == (2, 1, 2)
    assert [os.stat(chunk_dir.chunk_path(j)).st_mtime_ns for j in (0, 1)] == mtimes
    reference = store.read_store(tmp_path / "reference", "train")
    resumed = store.read_store(out, "train")
    np.testing.assert_array_equal(resumed.descriptors, reference.descriptors)
    assert resumed.manifest == reference.manifest

    # A finished store is not recomputed either.
    counting = _CountingExtractor(extractor)
    (report,) = _extract(counting, tree, out, splits=("train",))
    assert counting.images == 0 and report.chunks_skipped == 3


def test_other_settings_are_refused(extractor, tree, tmp_path):
    splits = extraction.load_met_splits(tree.info_dir, ("val",))
    crashing = _CountingExtractor(extractor, crash_after=0)
    with pytest.raises(_Crash):
        extraction.extract_met(crashing, _spec(), splits, tree.image_root, tmp_path, progress=False)
    other = _spec(weights="sha256:abc")
    with pytest.raises(ValueError, match=r"chunks computed with other settings .*sha256:abc"):
        extraction.extract_met(extractor, other, splits, tree.image_root, tmp_path, progress=False)
    extraction.extract_met(extractor, _spec(), splits, tree.image_root, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"val_manifest.json was extracted with other settings"):
        extraction.extract_met(extractor, other, splits, tree.image_root, tmp_path, progress=False)


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_bad_files_are_recorded_and_the_run_completes(extractor, tmp_path):
    rgb = exhibit_view(5, 0, (40, 56))
    gray16 = (np.arange(40 * 56, dtype=np.uint32).reshape(40, 56) * 29 % 65536).astype(np.uint16)
    alpha = np.concatenate([rgb, np.full((40, 56, 1), 7, np.uint8)], -1)
    root = tmp_path / "images"
    files = {
        "good.jpg": _encode(Image.fromarray(rgb), "JPEG", quality=90),
        "truncated.jpg": _encode(Image.fromarray(rgb), "JPEG", quality=90)[:300],
        "zero.jpg": b"",
        "text.jpg": b"<html>not found</html>\n",
        "cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "deep.png": _encode(Image.fromarray(gray16), "PNG"),
        "one_pixel.jpg": _encode(Image.fromarray(rgb[:1, :1]), "JPEG"),
        "alpha.png": _encode(Image.fromarray(alpha), "PNG"),
    }
    names = list(files) + ["missing.jpg"]
    for name, data in files.items():
        write_image(str(root / name), Image.new("RGB", (1, 1)))  # creates the folder
        (root / name).write_bytes(data)
    paths = [str(root / name) for name in names]
    (report,) = [
        extraction.extract_split(
            extractor, _spec(), "val", paths, tmp_path / "out", paths=names, progress=False
        )
    ]
    assert report.failed == 4
    loaded = store.read_store(tmp_path / "out", "val")
    bad = {"truncated.jpg", "zero.jpg", "text.jpg", "missing.jpg"}
    assert loaded.valid.tolist() == [name not in bad for name in names]
    errors = {e["path"]: e for e in loaded.manifest["errors"]}
    assert set(errors) == bad
    assert errors["missing.jpg"]["index"] == 8 and "No such file" in errors["missing.jpg"]["reason"]
    assert "empty" in errors["zero.jpg"]["reason"]
    assert "Unknown image file format" in errors["text.jpg"]["reason"]
    np.testing.assert_array_equal(loaded.descriptors[~loaded.valid], 0.0)

    expected_images = {
        "good.jpg": _pil_rgb(paths[0]),
        "cmyk.jpg": _pil_rgb(paths[4]),  # PIL's CMYK -> RGB, as the reference
        "deep.png": np.repeat(gray16[..., None] / 257.0, 3, -1).astype(np.float32),
        "one_pixel.jpg": _pil_rgb(paths[6]),
        "alpha.png": rgb.astype(np.float32),
    }
    for name, image in expected_images.items():
        row = names.index(name)
        np.testing.assert_allclose(
            loaded.descriptors[row], _one_by_one(extractor, [image])[0], atol=1e-5, err_msg=name
        )


def test_model_failures_and_non_finite_rows_are_invalid(tmp_path):
    sizes = [(8, 8), (9, 9), (10, 10), (8, 8)]
    paths = [
        write_image(str(tmp_path / f"{i}.png"), exhibit_view(i, 0, size), "PNG")
        for i, size in enumerate(sizes)
    ]
    calls = []

    def fragile(batch):
        height, count = int(batch.shape[1]), int(batch.shape[0])
        calls.append((height, count))
        if height == 9 or (height == 8 and count > 1):
            raise tf.errors.InvalidArgumentError(None, None, f"cannot run {height}x{height}")
        value = np.nan if height == 10 else 0.5
        return tf.fill([count, 2], value)

    spec = _spec(dim=2, chunk_size=10)
    extraction.extract_split(
        fragile, spec, "test", paths, tmp_path / "o", batch_images=2, progress=False
    )
    # the 8x8 pair fails as a batch, then succeeds one image at a time
    assert calls == [(8, 2), (8, 1), (8, 1), (9, 1), (10, 1)]
    loaded = store.read_store(tmp_path / "o", "test")
    assert loaded.valid.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(loaded.descriptors[[0, 3]], 0.5)
    reasons = {e["index"]: e["reason"] for e in loaded.manifest["errors"]}
    assert reasons == {
        1: "model failed: InvalidArgumentError: cannot run 9x9",
        2: "model gave a non-finite descriptor",
    }


def test_a_model_failing_on_everything_stops_the_run(tmp_path):
    paths = [
        write_image(str(tmp_path / f"{i}.png"), exhibit_view(i, 0, (8, 8 + i)), "PNG")
        for i in range(9)
    ]

    def broken(batch):
        raise tf.errors.ResourceExhaustedError(None, None, "out of memory")

    spec = _spec(dim=2, chunk_size=9)
    with pytest.raises(RuntimeError, match=r"failed on all 9 readable images of chunk 0"):
        extraction.extract_split(broken, spec, "test", paths, tmp_path / "o", progress=False)
    assert chunk_files.ChunkDirectory(tmp_path / "o", "test").finished([0]) == []


def test_a_model_with_non_finite_outputs_stops_the_run(tmp_path):
    # Broken weights give NaN for every image: the run stops (exit 1 in tfmet-extract) instead of
    # writing a store in which every row is "unreadable". A chunk with one good image goes on.
    paths = [
        write_image(str(tmp_path / f"{i}.png"), exhibit_view(i, 0, (8, 8 + i)), "PNG")
        for i in range(3)
    ]
    spec = _spec(dim=2, chunk_size=3)
    with pytest.raises(RuntimeError, match=r"non-finite .* for all 3 readable images of chunk 0"):
        extraction.extract_split(
            lambda batch: tf.fill([int(batch.shape[0]), 2], np.nan),
            spec,
            "test",
            paths,
            tmp_path / "o",
            progress=False,
        )
    assert chunk_files.ChunkDirectory(tmp_path / "o", "test").finished([0]) == []

    def one_good(batch):
        return tf.fill([int(batch.shape[0]), 2], 0.5 if int(batch.shape[2]) == 8 else np.nan)

    extraction.extract_split(one_good, spec, "test", paths, tmp_path / "p", progress=False)
    assert store.read_store(tmp_path / "p", "test").valid.tolist() == [True, False, False]


def test_write_store_rows_streams_blocks(tmp_path):
    blocks = [(2, np.full((1, 3), 2.0)), (0, np.arange(6.0).reshape(2, 3))]
    store.write_store_rows(tmp_path, "train", 3, 3, blocks, [True, False, True], source="x")
    loaded = store.read_store(tmp_path, "train")
    np.testing.assert_array_equal(loaded.descriptors, [[0, 1, 2], [3, 4, 5], [2, 2, 2]])
    assert loaded.valid.tolist() == [True, False, True] and loaded.manifest["source"] == "x"
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        store.write_store_rows(tmp_path, "val", 2, 3, [(0, np.zeros((1, 3)))], [True, True])


def test_met_paths_are_resolved_under_images(tree):
    (split,) = extraction.load_met_splits(tree.info_dir, ("val",))
    assert met.image_paths(split, tree.image_root)[0] == os.path.join(
        tree.image_root, "images", "test_met", "val_0.jpg"
    )


def test_fold_batchnorm_by_hand():
    import keras

    x = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, name="c")
    bn = keras.layers.BatchNormalization(epsilon=0.0, name="b")
    model = keras.Model(x, keras.layers.ReLU()(bn(conv(x))))
    conv.set_weights([np.full((1, 1, 1, 1), 2.0, np.float32)])
    bn.set_weights([np.array([3.0]), np.array([1.0]), np.array([0.5]), np.array([4.0])])
    folded, count = batchnorm.fold_batchnorm(model)
    # (2x - 0.5) * 3 / sqrt(4) + 1 = 3x + 0.25
    assert count == 1
    kernel, bias = folded.get_layer("c").get_weights()
    np.testing.assert_allclose(kernel.ravel(), [3.0])
    np.testing.assert_allclose(bias, [0.25])
    image = np.array([[[[-1.0], [0.0]], [[1.0], [2.0]]]], np.float32)
    np.testing.assert_allclose(folded(image).numpy().ravel(), [0.0, 0.25, 3.25, 6.25], atol=1e-6)
    np.testing.assert_allclose(model(image).numpy(), folded(image).numpy(), atol=1e-6)


def test_fold_batchnorm_leaves_shared_conv_outputs_alone():
    import keras

    x = keras.Input((None, None, 2))
    y = keras.layers.Conv2D(2, 3, padding="same")(x)
    z = keras.layers.Add()([keras.layers.BatchNormalization()(y), y])
    model = keras.Model(x, z)
    assert batchnorm.fold_batchnorm(model) == (model, 0)


def _randomise_batchnorm(model, seed):
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0, 0.2, n),
                    rng.normal(0, 0.2, n),
                    rng.uniform(0.5, 1.5, n),
                ]
            )


def test_folded_extractor_from_a_saved_model_matches(tmp_path):
    import keras

    embedder = Embedder.from_registry("resnet_tiny", projector_dim=4)
    embedder.build((None, None, None, 3))
    _randomise_batchnorm(embedder.backbone, seed=0)
    embedder.pool.set_weights([np.array(2.5, np.float32)])  # a "trained" GeM power
    path = str(tmp_path / "embedder.keras")
    embedder.save(path)
    reference = DescriptorExtractor(keras.saving.load_model(path))
    extractor, spec = spec_lib.build_extractor(model=path, fold_bn=True)

    def count(layers, kind):
        return sum(isinstance(layer, kind) for layer in layers)

    n_bn = count(embedder.backbone.layers, keras.layers.BatchNormalization)
    layers = extractor.embedder.backbone.layers
    assert n_bn == 12 and count(layers, keras.layers.BatchNormalization) == 0
    assert count(layers, batchnorm.FoldedBatchNorm) == n_bn
    assert spec.weights == spec_lib.weights_fingerprint(path) and spec.dim == 4
    image = np.random.default_rng(0).uniform(0, 255, (1, 45, 61, 3)).astype(np.float32)
    np.testing.assert_allclose(extractor(image).numpy(), reference(image).numpy(), atol=1e-5)
