"""tfmet-train-contrastive end to end, in subprocesses: smoke config, extraction, bad input.

(Resuming and the refusal to overwrite a run are tested in-process in
test_contrastive_training.py.)

CLI modules define absl flags at import, so they are only ever imported in child processes.
"""

import json
import os
import sys

import numpy as np
import pytest

from tests.kit.cli import REPO, run_command
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store

pytestmark = pytest.mark.slow  # every test runs the program in a subprocess

CONFIG = os.path.join(REPO, "configs", "met_contrastive_r18.py")


def _run(module, *flags, timeout=600):
    done = run_command([sys.executable, "-m", module, *flags], timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"))


def test_smoke_config_trains_and_the_model_extracts(tree, tmp_path):
    workdir = tmp_path / "run"
    common = [f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}"]
    code, log = _run(
        "tfmet.cli.train_contrastive",
        f"--config={CONFIG}:smoke",
        *common,
        f"--workdir={workdir}",
        "--pairs_type=pos+new_neg",
        "--seed=3",
    )
    assert code == 0, log
    model = workdir / "model" / "embedder.keras"
    assert f"Trained model: {model}" in log
    # Its next step, runnable as printed (tests/journeys/test_contrastive_journey.py runs it).
    printed = f"Extract with: tfmet-extract --model={model} {' '.join(common)} --output_dir="
    assert f"{printed}{workdir / 'extracted'}\n" in log
    with open(workdir / "config.json", encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded["pairs_type"] == "pos+new_neg" and recorded["seed"] == 3  # flags won
    assert recorded["net"] == "resnet_tiny" and recorded["epochs"] == 2  # from the config
    with open(workdir / "history.json", encoding="utf-8") as f:
        history = json.load(f)
    assert [e["epoch"] for e in history] == [1, 2]

    # tfmet-extract takes the trained model and reproduces the last validation descriptors.
    out = tmp_path / "extracted"
    code, log = _run(
        "tfmet.cli.extract",
        *common,
        f"--model={model}",
        f"--output_dir={out}",
        "--nomultiscale",
        "--splits=val",
        "--noprogress",
    )
    assert code == 0, log
    extracted = store.read_store(out, "val")
    validated = store.read_store(workdir / "descriptors" / "epoch_2", "val")
    np.testing.assert_allclose(extracted.descriptors, validated.descriptors, atol=1e-5)


def test_bad_input_exits_with_code_2(tree, tmp_path):
    code, log = _run("tfmet.cli.train_contrastive", f"--info_dir={tree.info_dir}")
    assert code == 2 and "missing --image_root, --workdir" in log
    code, log = _run(
        "tfmet.cli.train_contrastive",
        f"--info_dir={tmp_path / 'nowhere'}",
        f"--image_root={tree.image_root}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert code == 2 and "nowhere" in log and "Traceback" not in log


def test_the_batch_size_is_set_one_way(tree, tmp_path):
    """`--config.batch_size=N` (or `batch_size` in the config file); the reference's `bsize`
    is neither a flag nor a config entry."""
    same = (f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}")
    same += (f"--workdir={tmp_path / 'run'}", f"--config={CONFIG}:smoke")
    code, log = _run("tfmet.cli.train_contrastive", *same, "--bsize=3")
    assert (code, log.strip()) == (
        2,
        "tfmet-train-contrastive: error: Unknown command line flag 'bsize'. Did you mean: "
        "vbsizemul ?",
    )
    code, log = _run("tfmet.cli.train_contrastive", *same, "--config.bsize=3")
    assert (code, log.strip()) == (
        2,
        "tfmet-train-contrastive: error: --config.bsize: the config has no key 'bsize'",
    )
    assert not os.path.exists(tmp_path / "run")
