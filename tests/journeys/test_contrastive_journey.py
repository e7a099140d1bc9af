"""Contrastive fine-tuning of the real embedded model, then extraction with what it wrote.

tfmet-train-contrastive runs as docs/contrastive.md shows it (configs/met_contrastive_r18.py:smoke,
1 epoch, 64 px crops) on EfficientNet-Lite0 with its packaged ImageNet weights, over a Met tree
of real photos (`tests.kit.met_tree.write_photo_tree`). It prints its next step, `tfmet-extract
--model=<final model> --info_dir ... --output_dir <workdir>/extracted --max_side ...`; that
command is run as printed. Then, on every split:
- the descriptors are those of the run's last tf.train checkpoint (a different file from the
  printed .keras model), restored here into the Embedder its recorded config builds (< 1e-5);
- they are not the un-fine-tuned Lite0's, and the checkpoint's GeM p is the one the run's
  history logged, moved off its initial 3.0: the trained weights were used;
- they are L2-normalised, every row valid.
"""

import json
import os
import shlex
import sys

import numpy as np
import pytest

from tests.kit import run_command
from tests.kit.met_tree import PHOTO_TREE_MAX_SIDE, write_photo_tree

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)
SPLITS = ("train", "val", "test")


def _program(argv):
    """`argv` with its program from this environment's bin/, as a user types it; its stdout."""
    result = run_command([os.path.join(BIN, argv[0]), *map(str, argv[1:])])
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def _printed_next_step(stdout):
    """The extraction command training printed, split as a shell would."""
    found = [line for line in stdout.splitlines() if line.startswith("Extract with: ")]
    assert len(found) == 1, f"training printed {len(found)} 'Extract with' lines:\n{stdout}"
    argv = shlex.split(found[0].removeprefix("Extract with: "))
    assert argv[0] == "tfmet-extract", found[0]
    return argv


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    from tfmet.backbones import efficientnet_lite

    base = tmp_path_factory.mktemp("contrastive_journey")
    tree = write_photo_tree(base / "met")
    workdir = str(base / "run")
    output = os.path.join(workdir, "extracted")  # where the printed command extracts to
    location = (f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}")
    trained = _program(
        [
            "tfmet-train-contrastive", "--config=configs/met_contrastive_r18.py:smoke", *location,
            f"--workdir={workdir}", "--net=efficientnet_lite0",
            f"--weights={efficientnet_lite.pretrained_weights()}", "--epochs=1", "--imsize=64",
            f"--config.max_side={PHOTO_TREE_MAX_SIDE}",
        ]
    )  # fmt: skip
    extract = _printed_next_step(trained)
    assert extract[1:] == [
        f"--model={os.path.join(workdir, 'model', 'embedder.keras')}", *location,
        f"--output_dir={output}", f"--max_side={PHOTO_TREE_MAX_SIDE}",
    ]  # fmt: skip
    _program(extract)
    return dict(tree=tree, workdir=workdir, output=output, extract=extract)


@pytest.fixture(scope="module")
def extracted(journey):
    """{split: the store tfmet-extract wrote}."""
    from tfmet.data.descriptor_store import read_store

    return {split: read_store(journey["output"], split, mmap=False) for split in SPLITS}


def _describe(embedder, tree, paths):
    """Multi-scale descriptors of the images at `paths` (Met paths under the tree's images/),
    decoded and capped at PHOTO_TREE_MAX_SIDE as tfmet-extract does."""
    from tfmet.data.images import cap_max_side, decode_image
    from tfmet.descriptors.embedder import DescriptorExtractor

    extractor = DescriptorExtractor(embedder)
    rows = []
    for path in paths:
        with open(os.path.join(tree.image_root, "images", path), "rb") as f:
            image = cap_max_side(decode_image(f.read()), PHOTO_TREE_MAX_SIDE)
        rows.append(extractor(image[None]).numpy()[0])
    return np.stack(rows)


@pytest.fixture(scope="module")
def in_process(journey, extracted):
    """The run's last checkpoint restored into a fresh Embedder, and the un-fine-tuned one (the
    same config without the restore): {"trained" | "initial": {split: descriptors}}, GeM p."""
    import keras
    import tensorflow as tf

    from tfmet.training.contrastive.trainer import build_embedder
    from tfmet.training.contrastive.workdir import CHECKPOINT_DIR, CONFIG_FILE

    with open(os.path.join(journey["workdir"], CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    initial, trained = build_embedder(config), build_embedder(config)
    latest = tf.train.latest_checkpoint(os.path.join(journey["workdir"], CHECKPOINT_DIR))
    restored = tf.train.Checkpoint(embedder=trained).restore(latest)
    restored.assert_existing_objects_matched().expect_partial()  # the optimizer is not needed
    described = {
        name: {
            split: _describe(embedder, journey["tree"], extracted[split].manifest["paths"])
            for split in SPLITS
        }
        for name, embedder in (("trained", trained), ("initial", initial))
    }
    return described, float(keras.ops.convert_to_numpy(trained.pool.power))


def test_extract_with_the_printed_command_gives_the_checkpoints_descriptors(
    journey, extracted, in_process
):
    from tfmet.io.hashing import file_sha256

    described, _ = in_process
    model = journey["extract"][1].removeprefix("--model=")
    for split, store in extracted.items():
        assert store.manifest["weights_sha256"] == "sha256:" + file_sha256(model)
        diff = np.abs(store.descriptors - described["trained"][split]).max()
        assert diff < 1e-5, f"{split}: max abs diff {diff}"


def test_fine_tuning_changed_the_model(journey, extracted, in_process):
    described, p = in_process
    with open(os.path.join(journey["workdir"], "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    assert [entry["epoch"] for entry in history] == [1]
    assert history[-1]["global_step"] >= 1
    assert p == pytest.approx(history[-1]["gem_p"], abs=1e-6)
    assert abs(p - 3.0) > 1e-6
    for split, store in extracted.items():
        diff = np.abs(store.descriptors - described["initial"][split]).max()
        assert diff > 1e-3, f"{split}: the un-fine-tuned model's descriptors (max abs diff {diff})"


def test_descriptors_are_l2_normalised(extracted):
    for split, store in extracted.items():
        assert store.valid.all(), store.manifest["errors"]
        norms = np.linalg.norm(store.descriptors, axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5, err_msg=split)
