"""tfmet-extract-beam gives tfmet-extract's descriptors, with the real embedded model.

docs/beam.md promises that the Beam pipeline's stores are tfmet-extract's "bit for bit in format
and to float rounding in values". tests/beam checks that on a tiny random backbone; here both
programs run as a user types them, with the same flags, on EfficientNet-Lite0 and its packaged
ImageNet weights, over a Met tree of real photos (`tests.kit.met_tree.write_photo_tree`): Beam
on the DirectRunner, through the descriptor SavedModel it exports for its workers, tfmet-extract
with the Keras model (both with BatchNorms folded, their default). Chunks of 4 rows
cut every split in two, so the merge order is checked too. Then:
- every split's store has the same manifest (paths, Met ids, model fingerprint, settings) and
  the same descriptors (max abs diff < 1e-5), every row valid, and nothing in the dead letters;
- the model is the real one: the fingerprint is the packaged weights' file, and each Met
  visitor photo's nearest database descriptor is its exhibit's.
"""

import os
import sys

import numpy as np
import pytest

from tests.kit import run_command
from tests.kit.met_tree import PHOTO_TREE_MAX_SIDE, write_photo_tree

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)
SPLITS = ("train", "val", "test")


def _program(name, *args):
    """`name` from this environment's bin/, as a user types it; its log (stderr)."""
    result = run_command([os.path.join(BIN, name), *map(str, args)])
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tfmet.backbones import efficientnet_lite

    base = tmp_path_factory.mktemp("beam_journey")
    tree = write_photo_tree(base / "met")
    weights = efficientnet_lite.pretrained_weights()
    same = (
        f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}",
        "--backbone=efficientnet_lite0", f"--weights={weights}",
        f"--max_side={PHOTO_TREE_MAX_SIDE}", "--chunk_size=4",
    )  # fmt: skip
    single, beam = str(base / "single"), str(base / "beam")
    _program("tfmet-extract", *same, f"--output_dir={single}", "--noprogress")
    log = _program("tfmet-extract-beam", *same, f"--output_dir={beam}", "--batch_size=4")
    return dict(tree=tree, weights=weights, single=single, beam=beam, log=log)


def test_beam_stores_are_tfmet_extracts(runs):
    from tfmet.beam.pipeline import read_dead_letters
    from tfmet.data.descriptor_store import read_store

    images = 0
    for split in SPLITS:
        beam, single = read_store(runs["beam"], split), read_store(runs["single"], split)
        assert beam.manifest == single.manifest, split
        assert single.valid.all(), single.manifest["errors"]
        diff = np.abs(np.asarray(beam.descriptors) - np.asarray(single.descriptors)).max()
        assert diff < 1e-5, f"{split}: max abs diff {diff}"
        images += single.count
    assert f"Beam run DONE: 6 chunks, {images} images (0 failed)" in runs["log"]
    assert read_dead_letters(runs["beam"]) == []


def test_the_descriptors_are_the_real_models(runs):
    from tfmet.data.descriptor_store import read_store
    from tfmet.io.hashing import file_sha256

    database = read_store(runs["beam"], "train")
    assert database.manifest["backbone"] == "efficientnet_lite0"
    assert database.manifest["weights_sha256"] == "sha256:" + file_sha256(runs["weights"])
    for split in ("val", "test"):
        queries = read_store(runs["beam"], split)
        met = np.asarray(queries.manifest["labels"]) != -1  # distractors have no Met id
        assert met.sum() == 4
        nearest = np.argmax(queries.descriptors[met] @ database.descriptors.T, axis=1)
        np.testing.assert_array_equal(
            np.asarray(database.manifest["labels"])[nearest],
            np.asarray(queries.manifest["labels"])[met],
        )
