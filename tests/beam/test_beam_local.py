"""Local features from the Beam pipeline == tfmet-extract's (`--local_features N --local_dim D`).

Both programs run as a user types them, with the same flags, on a tiny Met tree with one broken
file: tfmet-extract with the Keras model, tfmet-extract-beam (DirectRunner, chunks left for the
merge) through the descriptor SavedModel it exports with a `local_features` signature. After
merging, the Beam store's local arrays must be tfmet-extract's: the same counts and points
(exactly), local descriptors within float16 rounding, scores to float rounding, and zeros for the
failed row. Resuming: a chunk removed from the Beam output is the only one a rerun computes, and
the merge is the same again. Models that cannot give the local features asked for are refused in
one line.
"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.kit.cli import run_cli
from tests.kit.met_tree import write_met_tree
from tfmet.beam import pipeline
from tfmet.beam.chunks import ChunkOutput
from tfmet.data import descriptor_store as store
from tfmet.descriptors import chunk_files, extraction
from tfmet.descriptors.local import LocalSpec

SPLITS = ("train", "val")
CHUNK_SIZE = 3  # train 4 rows -> chunks of 3, 1; val 7 rows -> 3, 3, 1
LOCAL = ("--local_features=20", "--local_dim=16")  # resnet_tiny's map has 32 channels: projected
FLOAT16_TOLERANCE = 2e-3  # |x| <= 1: float16 rounding is at most 2^-11 ~ 4.9e-4 per value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_local")
    tree = write_met_tree(root / "met", num_exhibits=2, images_per_exhibit=2)
    with open(tree.image_path(tree.entries("val")[1]["path"]), "wb") as f:
        f.write(b"not an image")
    same = (
        f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}",
        "--backbone=resnet_tiny", f"--chunk_size={CHUNK_SIZE}", f"--splits={','.join(SPLITS)}",
        *LOCAL,
    )  # fmt: skip
    single, beam = str(root / "single"), str(root / "beam")
    done = run_cli("extract", *same, f"--output_dir={single}", "--noprogress")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli(
        "extract_beam", *same, f"--output_dir={beam}", "--batch_size=4", "--tf_threads=1",
        "--nomerge_when_done", "--keep_chunks", "--direct_running_mode=in_memory",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Beam run DONE: 5 chunks, 11 images (1 failed)" in done.stderr
    return root, tree, single, beam


def _assert_same_local(beam_dir, single_dir):
    """The Beam store's global and local arrays against tfmet-extract's; returns the diffs."""
    diffs = {}
    for split in SPLITS:
        beam, single = store.read_store(beam_dir, split), store.read_store(single_dir, split)
        assert beam.manifest == single.manifest  # local_features entry included
        assert np.abs(beam.descriptors - single.descriptors).max() < 1e-5
        b, s = store.read_local(beam_dir, split), store.read_local(single_dir, split)
        np.testing.assert_array_equal(b.counts, s.counts)
        np.testing.assert_array_equal(b.points, s.points)
        descriptors = np.abs(b.descriptors.astype(np.float32) - s.descriptors).max()
        assert descriptors <= FLOAT16_TOLERANCE, f"{split}: local descriptors differ {descriptors}"
        np.testing.assert_allclose(b.scores, s.scores, rtol=1e-5, atol=1e-5)
        diffs[split] = float(descriptors)
    return diffs


@pytest.mark.slow
def test_beam_local_arrays_are_tfmet_extracts(runs):
    root, tree, single, beam = runs
    for split in SPLITS:
        chunk_files.merge_split(beam, split, keep_chunks=True)
    diffs = _assert_same_local(beam, single)
    print("max |local descriptor diff| per split:", diffs)
    manifest = store.read_store(beam, "val").manifest
    assert manifest["local_features"] == {"num": 20, "dim": 16, "seed": 0, "local_dim": 16}
    local = store.read_local(beam, "val")
    assert local.descriptors.shape == (7, 20, 16) and local.descriptors.dtype == np.float16
    # the broken row keeps no local features; every good one some
    assert local.counts[1] == 0 and np.all(np.asarray(local.descriptors[1]) == 0)
    assert np.all(local.counts[np.asarray(manifest["valid"])] > 0)
    norms = np.linalg.norm(local.descriptors[0, : local.counts[0]].astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=FLOAT16_TOLERANCE)


@pytest.mark.slow
def test_a_rerun_computes_only_the_missing_chunk(runs, tmp_path):
    root, tree, single, beam = runs
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(beam, "chunks"), os.path.join(copy, "chunks"))
    os.remove(ChunkOutput(copy, "val").chunk_path(1))
    model = os.path.join(beam, "model")
    local = LocalSpec(num=20, dim=16)
    spec = pipeline.saved_model_spec(model, CHUNK_SIZE, local)
    met_splits = extraction.load_met_splits(tree.info_dir, SPLITS)
    plan = pipeline.plan_extraction(spec, met_splits, tree.image_root, copy)
    assert [tuple(t) for t in plan.tasks] == [("val", 1, 3, 6)]
    report = pipeline.run_extraction(plan, model, ["--direct_running_mode=in_memory"])
    assert (report.state, report.images, report.failed) == ("DONE", 3, 0)
    for split in SPLITS:
        chunk_files.merge_split(copy, split)
    _assert_same_local(copy, single)
    # Chunks without local features are other settings: never mixed into this store.
    no_local = pipeline.saved_model_spec(model, CHUNK_SIZE)
    assert no_local.local is None
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(beam, "chunks"), os.path.join(other, "chunks"))
    with pytest.raises(ValueError, match="other settings"):
        pipeline.plan_extraction(no_local, met_splits, tree.image_root, other)


@pytest.mark.slow
def test_a_model_with_other_local_features_is_refused_in_one_line(runs, tmp_path):
    root, tree, single, beam = runs
    done = run_cli(
        "extract_beam", f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}",
        f"--output_dir={tmp_path / 'out'}", f"--saved_model={os.path.join(beam, 'model')}",
        "--local_features=10", "--local_dim=16", f"--chunk_size={CHUNK_SIZE}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("tfmet-extract-beam: error: ")
    assert "the model computes local features" in lines[-1] and "'num': 10" in lines[-1]
    assert "Traceback" not in done.stderr


def _metadata(tmp_path, **extra):
    model = tmp_path / "model"
    (model / "assets").mkdir(parents=True, exist_ok=True)
    metadata = {
        "kind": "descriptor",
        "backbone": "resnet_tiny",
        "weights_sha256": "random:seed=0",
        "scales": [1.0],
        "resize_method": "torch",
        "max_side": None,
        "dim": 64,
        "pca_whitening": False,
        **extra,
    }
    (model / "assets" / "tfmet_metadata.json").write_text(json.dumps(metadata))
    return str(model)


def test_saved_model_spec_checks_the_local_features_asked_for(tmp_path):
    local = LocalSpec(num=20, dim=16)
    model = _metadata(tmp_path)
    assert pipeline.saved_model_spec(model).local is None
    with pytest.raises(ValueError, match="computes no local features; --local_features needs"):
        pipeline.saved_model_spec(model, local=local)
    entry = {"num": 20, "dim": 16, "seed": 0, "local_dim": 16}
    model = _metadata(tmp_path, local_features=entry)
    assert pipeline.saved_model_spec(model, local=local).local == local
    assert pipeline.model_local_dim(model, local) == 16
    assert pipeline.saved_model_spec(model).local is None  # global descriptors only
    for other in (LocalSpec(num=20, dim=32), LocalSpec(num=20, dim=16, seed=1)):
        with pytest.raises(ValueError, match="not the .* asked for"):
            pipeline.saved_model_spec(model, local=other)
