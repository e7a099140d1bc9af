"""Killing a program at its write steps leaves the old output set or the new one (issue #14).

strace's fault injection delivers SIGKILL at the Nth `rename` system call of the program: every
commit step of every output is a kill point (tfmet's own renames; of TensorFlow's renames inside
a staging folder, all equivalent, the first and the last). After each kill, the next start's
recovery runs (`recover_directory`, `recover_commits`, `clean_stale_temporaries`: what the
program does first) and the outputs must be exactly the old set or exactly the new one, with no
temporaries left.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.kit.cli import ENV, REPO
from tests.kit.met_tree import write_met_tree
from tfmet.descriptors import store
from tfmet.io.atomic import clean_stale_temporaries, recover_commits, recover_directory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)"),
]

MAX_KILLS = 40


def _program(module, *args):
    return [sys.executable, "-m", f"tfmet.cli.{module}", *map(str, args)]


def _run(command, kill_at=None):
    if kill_at is not None:
        command = [
            "strace",
            "-f",
            "-qq",
            "-o",
            os.devnull,
            "-e",
            "trace=rename",
            "-e",
            f"inject=rename:signal=SIGKILL:when={kill_at}",
            *command,
        ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def traced_renames(command, listing):
    """Runs `command` to completion under strace; the lines of its `rename` calls, in order (the
    Nth is what `_run(command, kill_at=N)` kills at)."""
    traced = subprocess.run(
        ["strace", "-f", "-qq", "-o", listing, "-e", "trace=rename", *command],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert traced.returncode == 0, traced.stderr[-2000:]
    return [line for line in listing.read_text().splitlines() if "rename(" in line]


def kill_at_every_rename(command, check):
    """Runs `command` killed at its 1st, 2nd, ... rename until a run completes; calls
    `check(n)` after each kill. Returns the number of kills."""
    for n in range(1, MAX_KILLS):
        result = _run(command, kill_at=n)
        if result.returncode == 0:
            return n - 1
        assert result.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), result.stderr[-2000:]
        check(n)
    raise AssertionError(f"still killed after {MAX_KILLS} renames")


def no_temporaries(directory):
    clean_stale_temporaries(directory)
    left = [n for n in os.listdir(directory) if n.startswith((".tmp-", ".tfmet-commit-"))]
    assert left == [] and not [n for n in os.listdir(directory) if ".old-" in n], left


def test_export_force_killed_at_every_rename(tmp_path):
    out = tmp_path / "export"

    def export(seed):
        return _program(
            "export",
            "--kind=descriptor",
            "--backbone=resnet_tiny",
            f"--seed={seed}",
            f"--out={out}",
        )

    def fingerprint():
        with open(out / "assets" / "tfmet_metadata.json") as f:
            return json.load(f)["weights_sha256"]

    assert _run(export(1)).returncode == 0
    old = fingerprint()
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    # The renames of a complete `--force` run, in order: TensorFlow's within the staging folder,
    # then the swap (the old export aside, the new one in). A kill at any rename inside the
    # staging folder leaves the same state (the old export, a temporary): the first and the last
    # of those stand for the rest; every rename outside it is a kill point.
    renames = traced_renames([*export(2), "--force"], tmp_path / "renames.txt")
    new = fingerprint()
    staged = [
        n for n, line in enumerate(renames, 1) if re.search(r'rename\("[^"]*", "[^"]*/\.tmp-', line)
    ]
    swap = [n for n in range(1, len(renames) + 1) if n not in staged]
    assert len(staged) >= 3 and len(swap) == 2, renames  # variables, saved_model.pb, fingerprint
    seen = set()
    for n in [staged[0], staged[-1], *swap]:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        result = _run([*export(2), "--force"], kill_at=n)
        assert result.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), result.stderr[-2000:]
        recover_directory(out)  # what the next export does first
        assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()
        seen.add(fingerprint())
        no_temporaries(tmp_path)
    # SIGKILL lands as a rename starts, so every kill point leaves the old export (after the
    # swap's first step, put back by the recovery); the complete traced run gave the new one.
    assert new != old and seen == {old}


def test_knn_eval_outputs_killed_at_every_rename(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=3, met_queries=2)
    from tfmet.data import met

    stores = tmp_path / "stores"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        gt = met.load_split(tree.info_dir, split)
        rows = rng.normal(size=(len(gt), 8)).astype(np.float32)
        store.write_store(stores, split, rows / np.linalg.norm(rows, axis=1, keepdims=True))

    def knn(k, output_dir):
        return _program(
            "knn_eval", stores, f"--info_dir={tree.info_dir}", "-k", k, "-t", 1, "--raw"
        ) + [f"--output_dir={output_dir}", "--target_precision=0.5"]

    def outputs(directory):
        with open(directory / "knn_results.json") as f:
            results = json.load(f)
        with np.load(directory / "knn_predictions.npz") as data:
            predictions = {name: data[name].tolist() for name in data.files}
        events = os.listdir(directory / "tensorboard" / "knn_eval")
        log = (directory / "log_knn.txt").read_text()
        return results["k"], predictions, len(events), log.count("expname:")

    # The two complete sets: k=1 (old), then k=2 written over it (new).
    references = {}
    for k in (1, 2):
        directory = tmp_path / f"ref{k}"
        assert _run(knn(1, directory)).returncode == 0
        if k == 2:
            assert _run(knn(2, directory)).returncode == 0
        references[k] = outputs(directory)
    assert references[1][1] != references[2][1]  # the two sets differ in their predictions

    work = tmp_path / "work"
    seen = set()

    def check(n):
        recover_commits(work)  # what the next knn-eval does first
        state = outputs(work)
        assert state in (references[1], references[2]), n
        seen.add(state[0])
        no_temporaries(work)
        shutil.rmtree(work)  # back to the old set for the next kill point
        shutil.copytree(tmp_path / "ref1", work)

    shutil.copytree(tmp_path / "ref1", work)
    kills = kill_at_every_rename(knn(2, work), check)
    assert outputs(work) == references[2]
    assert kills >= 8 and seen == {1, 2}  # kills before and after the commit point


def _checkpoint(workdir):
    """(state epoch, best epoch, best top-1, best weights, last weights) of a style run."""
    directory = os.path.join(workdir, "checkpoints")
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)

    def weights(name):
        with np.load(os.path.join(directory, name)) as data:
            return [data[k] for k in sorted(data.files) if k.startswith("w")]

    return (
        state["epoch"],
        state["best_epoch"],
        state["best_top1"],
        weights("best.weights.npz"),
        (weights("last.weights.npz")),
    )


def _same(a, b):
    return a[:3] == b[:3] and all(
        np.array_equal(x, y) for x, y in zip(a[3] + a[4], b[3] + b[4], strict=True)
    )


def test_style_checkpoints_killed_at_every_rename_of_a_checkpoint(tmp_path):
    from tests.kit import style_data

    data, cache = tmp_path / "pandora", tmp_path / "cache"
    style_data.make_pandora18k(str(data), num_classes=3, artists=2, images_per_artist=4, size=32)

    def train(workdir, epochs):
        return _program(
            "train_style",
            "--config=configs/pandora18k.py:smoke",
            f"--config.dataset.root={data}",
            f"--config.cache_dir={cache}",
            f"--config.train.epochs={epochs}",
            "--config.train.patience=0",
            "--config.train.learning_rate=0.1",
            f"--workdir={workdir}",
        )

    # References: the checkpoint after epoch 1 and after epoch 2 (the feature cache is warm
    # after the first run, so later runs make the same renames in the same order).
    assert _run(train(tmp_path / "one", 1)).returncode == 0
    after = {1: _checkpoint(tmp_path / "one")}
    renames = traced_renames(train(tmp_path / "two", 2), tmp_path / "renames.txt")
    after[2] = _checkpoint(tmp_path / "two")
    # The kill points: every rename that writes the second epoch's checkpoint set.
    points = [n for n, line in enumerate(renames, 1) if "checkpoints" in line]
    stagings = [re.search(r"\.tmp-\d+-checkpoints-\w+", renames[n - 1]) for n in points]
    first = next(m.group(0) for m in stagings if m)
    end_of_first = max(
        n for n, m in zip(points, stagings, strict=True) if m and m.group(0) == first
    )
    second = [n for n in points if n > end_of_first]
    assert len(second) >= 5, renames

    epochs_seen = set()
    for n in second:
        workdir = tmp_path / f"killed{n}"
        result = _run(train(workdir, 2), kill_at=n)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        recover_directory(workdir / "checkpoints")  # what a resumed run does first
        state = _checkpoint(workdir)
        assert _same(state, after[state[0]]), n  # one epoch's complete set, never a mix
        epochs_seen.add(state[0])
        no_temporaries(workdir)
    assert epochs_seen == {1, 2}
