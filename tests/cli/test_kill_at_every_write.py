"""Killing a program at its write steps leaves the old output set or the new one (issue #14).

The program gets SIGKILL as its Nth `rename` call starts (`tests.kit.rename_kill`, an LD_PRELOAD
library that numbers the renames of the program and its children): every commit step of every
output is a kill point (tfmet's own renames; of TensorFlow's renames inside
a staging folder, all equivalent, the first and the last). After each kill, the next start's
recovery runs (`recover_directory`, `recover_commits`, `clean_stale_temporaries`: what the
program does first) and the outputs must be exactly the old set or exactly the new one, with no
temporaries left.

A kill point costs a whole program run, so the knn-eval and style tests kill at a sample of their
write points, as the export test does: the first and the last, and one point of each kind of
write (`write_kinds`: a file staged under a temporary name, the commit record, a file or folder
put into place, an old folder set aside, the new one swapped in), picked with a fixed seed
(`SEED`) so that every run kills at the same points. Within a kind the points leave equivalent
states; the first and the last stand on each side of the commit.
"""

import json
import os
import random
import re
import shutil
import signal
import sys

import numpy as np
import pytest

from tests.kit import rename_kill
from tests.kit.cli import run_command
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store
from tfmet.io.atomic import clean_stale_temporaries, recover_commits, recover_directory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        rename_kill.COMPILER is None,
        reason="needs a C compiler for tests/kit/rename_kill.c (.ci/run installs gcc)",
    ),
]

SEED = 27  # the sample of kill points (issue #27)
RENAME = re.compile(r'rename\("([^"]*)", "([^"]*)"\)')


def _program(module, *args):
    return [sys.executable, "-m", f"tfmet.cli.{module}", *map(str, args)]


def traced_renames(command, listing):
    """Runs `command` to completion with its renames listed; the lines of its `rename` calls, in
    order (the Nth is what `kill_at(command, N)` kills at)."""
    traced = rename_kill.run_renames(command, listing=listing)
    assert traced.returncode == 0, traced.stderr[-2000:]
    return [line for line in listing.read_text().splitlines() if "rename(" in line]


def write_kinds(renames):
    """The kind of write of each traced rename line (module docstring): "staged" (to a
    temporary name, or inside a temporary folder), "commit record", "set aside" (to `.old-`),
    "swapped in" (to a path set aside before), else "into place"."""
    kinds, aside = [], set()
    for line in renames:
        source, target = RENAME.search(line).groups()
        name, folder = os.path.basename(target), os.path.basename(os.path.dirname(target))
        if name.startswith(".tfmet-commit-"):
            kinds.append("commit record")
        elif ".old-" in name:
            kinds.append("set aside")
            aside.add(source)
        elif target in aside:
            kinds.append("swapped in")
        elif name.startswith(".tmp-") or folder.startswith(".tmp-"):
            kinds.append("staged")
        else:
            kinds.append("into place")
    return kinds


def sample_kill_points(points, kinds, seed=SEED):
    """The kill points of `points` (rename numbers, in order, each of the kind at the same place
    in `kinds`): the first, the last and one of each kind, chosen by `random.Random(seed)`."""
    rng = random.Random(seed)
    chosen = {points[0], points[-1]}
    for kind in sorted(set(kinds)):
        chosen.add(rng.choice([n for n, k in zip(points, kinds, strict=True) if k == kind]))
    return sorted(chosen)


def test_the_sample_has_the_first_and_last_point_and_every_kind():
    renames = [
        'rename("/o/.tmp-1-a-.tmp-1-r.json", "/o/.tmp-1-r.json")',
        'rename("/o/.tmp-1-b-.tmp-1-p.npz", "/o/.tmp-1-p.npz")',
        'rename("/o/.tmp-1-c-.tfmet-commit-x.json", "/o/.tfmet-commit-x.json")',
        'rename("/o/.tmp-1-r.json", "/o/r.json")',
        'rename("/o/.tmp-1-p.npz", "/o/p.npz")',
        'rename("/o/tb", "/o/tb.old-q")',
        'rename("/o/.tmp-1-tb-z", "/o/tb")',
        'rename("/o/.tmp-1-log.txt", "/o/log.txt")',
    ]
    kinds = write_kinds(renames)
    assert kinds == ["staged", "staged", "commit record", "into place", "into place",
                     "set aside", "swapped in", "into place"]  # fmt: skip
    points = list(range(1, 9))
    sample = sample_kill_points(points, kinds)
    assert sample == sample_kill_points(points, kinds)  # seeded: the same points every run
    assert sample[0] == 1 and sample[-1] == 8 and len(sample) < len(points)
    assert {kinds[n - 1] for n in sample} == set(kinds)


# Three renames, the second in a child process: the library numbers them across the two.
RENAMES = """
import os, subprocess, sys
d = sys.argv[1]
step = "import os; open(f'{d}/{n}', 'w').close(); os.rename(f'{d}/{n}', f'{d}/{n}.done')"
exec(step.format(d=d, n=1))
subprocess.run([sys.executable, "-c", step.format(d=d, n=2)], check=True)
exec(step.format(d=d, n=3))
"""


def test_the_library_lists_the_renames_and_kills_as_the_nth_starts(tmp_path):
    def files(name):
        return sorted(os.listdir(tmp_path / name))

    for name in ("whole", "2", "3"):
        (tmp_path / name).mkdir()
    listed = rename_kill.run_renames(
        [sys.executable, "-c", RENAMES, tmp_path / "whole"], listing=tmp_path / "renames.txt"
    )
    assert listed.returncode == 0, listed.stderr
    assert (tmp_path / "renames.txt").read_text().splitlines() == [
        f'rename("{tmp_path}/whole/{n}", "{tmp_path}/whole/{n}.done")' for n in (1, 2, 3)
    ]
    assert files("whole") == ["1.done", "2.done", "3.done"]
    # Killed at the 2nd: the child dies before renaming (the parent's check then fails).
    child = rename_kill.run_renames([sys.executable, "-c", RENAMES, tmp_path / "2"], kill_at=2)
    assert child.returncode == 1 and "died with <Signals.SIGKILL: 9>" in child.stderr
    assert files("2") == ["1.done", "2"]
    parent = rename_kill.run_renames([sys.executable, "-c", RENAMES, tmp_path / "3"], kill_at=3)
    assert parent.returncode == -signal.SIGKILL and files("3") == ["1.done", "2.done", "3"]


def kill_at(command, n):
    """Runs `command` killed by SIGKILL at its nth rename; fails unless the kill landed."""
    result = rename_kill.run_renames(command, kill_at=n)
    assert result.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (n, result.stderr[-2000:])


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

    assert run_command(export(1)).returncode == 0
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
        kill_at([*export(2), "--force"], n)
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

    # The two complete sets: k=1 (old), then k=2 written over it (new), traced: its renames,
    # in order, are the kill points.
    old, work = tmp_path / "ref1", tmp_path / "work"
    assert run_command(knn(1, old)).returncode == 0
    shutil.copytree(old, work)
    renames = traced_renames(knn(2, work), tmp_path / "renames.txt")
    references = {1: outputs(old), 2: outputs(work)}
    assert references[1][1] != references[2][1]  # the two sets differ in their predictions

    seen = set()
    kinds = write_kinds(renames)
    sample = sample_kill_points(list(range(1, len(renames) + 1)), kinds)
    for n in sample:
        shutil.rmtree(work)  # the old set for each kill point
        shutil.copytree(old, work)
        kill_at(knn(2, work), n)
        recover_commits(work)  # what the next knn-eval does first
        state = outputs(work)
        assert state in (references[1], references[2]), n
        seen.add(state[0])
        no_temporaries(work)
    # Kill points before and after the commit point, every kind of write among them.
    assert len(renames) >= 8 and seen == {1, 2}
    assert {kinds[n - 1] for n in sample} == {
        "staged",
        "commit record",
        "into place",
        "set aside",
        "swapped in",
    }, renames


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
    assert run_command(train(tmp_path / "one", 1)).returncode == 0
    after = {1: _checkpoint(tmp_path / "one")}
    renames = traced_renames(train(tmp_path / "two", 2), tmp_path / "renames.txt")
    after[2] = _checkpoint(tmp_path / "two")
    # The kill points: every rename from the first of the second epoch's checkpoint set on (its
    # writes, then those after its commit, which must leave it in place). The checkpoint renames
    # are those in or of two/checkpoints or a staging folder of it (the test's own folder is
    # named after checkpoints too).
    of_checkpoints = re.compile(
        re.escape(f'"{tmp_path / "two"}/') + r"(checkpoints|\.tmp-\d+-checkpoints-)"
    )
    points = [n for n, line in enumerate(renames, 1) if of_checkpoints.search(line)]
    stagings = [re.search(r"\.tmp-\d+-checkpoints-\w+", renames[n - 1]) for n in points]
    first = next(m.group(0) for m in stagings if m)
    end_of_first = max(
        n for n, m in zip(points, stagings, strict=True) if m and m.group(0) == first
    )
    second = [n for n in points if n > end_of_first]
    assert len(second) >= 5, renames
    after_first = list(range(end_of_first + 1, len(renames) + 1))
    every_kind = write_kinds(renames)
    kinds = [every_kind[n - 1] for n in after_first]
    sample = sample_kill_points(after_first, kinds)
    assert {every_kind[n - 1] for n in second} == {"staged", "set aside", "swapped in"}, renames
    assert (
        {every_kind[n - 1] for n in sample}
        == {*kinds}
        == {"staged", "set aside", "swapped in", "into place"}
    ), renames

    epochs_seen = set()
    for n in sample:
        workdir = tmp_path / f"killed{n}"
        kill_at(train(workdir, 2), n)
        recover_directory(workdir / "checkpoints")  # what a resumed run does first
        state = _checkpoint(workdir)
        assert _same(state, after[state[0]]), n  # one epoch's complete set, never a mix
        epochs_seen.add(state[0])
        no_temporaries(workdir)
    assert epochs_seen == {1, 2}
