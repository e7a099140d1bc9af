"""A recogniser exported with --rerank=spatial: its assets, and answers verified as knn-eval's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.kit.cli import REPO
from tests.kit.met_tree import write_met_tree
from tfmet.data import met
from tfmet.data.descriptor_store import read_local
from tfmet.retrieval import spatial

pytestmark = pytest.mark.slow


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerank_export")
    tree = write_met_tree(tmp / "met", num_exhibits=4, images_per_exhibit=2)
    desc = tmp / "desc"
    done = _run("tfmet.cli.extract", f"--info_dir={tree.info_dir}",
                f"--image_root={tree.image_root}", "--backbone=resnet_tiny", "--noprogress",
                f"--output_dir={desc}", "--local_features=30")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    done = _run("tfmet.cli.knn_eval", str(desc), f"--info_dir={tree.info_dir}", "--raw", "-k",
                "2", "-t", "0.1", "--rerank=spatial")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # Random weights: val may choose weight 0 (the global decision); a weight that moves the
    # confidences makes the comparison below test the rule, not only the inliers.
    results = json.loads((desc / "knn_results.json").read_text())
    results["rerank"].update(weight=0.5, saturation=8)
    (desc / "knn_results.json").write_text(json.dumps(results))
    export = ["tfmet.cli.export", "--kind=recognizer", "--backbone=resnet_tiny", "--raw",
              f"--descriptor_dir={desc}", f"--info_dir={tree.info_dir}"]  # fmt: skip
    results = desc / "knn_results.json"
    done = _run(*export, f"--results_json={results}", "--rerank=spatial", f"--out={tmp / 'rec'}")
    assert done.returncode == 0, done.stderr[-2000:]
    return tree, desc, tmp / "rec", export


def test_the_export_says_how_it_verifies_and_holds_the_database_local_features(exported):
    tree, desc, rec, _ = exported
    with open(os.path.join(rec, "assets", "tfmet_metadata.json")) as f:
        metadata = json.load(f)
    with open(desc / "knn_results.json") as f:
        block = json.load(f)["rerank"]
    rerank = metadata["rerank"]
    assert rerank["method"] == "spatial" and rerank["top"] == 8  # 20, capped at the database
    for key in ("weight", "saturation", "residual_threshold"):
        assert rerank[key] == block[key]
    assert rerank["threshold"] == pytest.approx(block["threshold"]["value"], rel=1e-6)
    assert rerank["local_features"]["num"] == 30
    store = read_local(desc, "train")
    points = np.load(os.path.join(rec, "assets", "rerank_local_points.npy"), allow_pickle=False)
    assert np.array_equal(points, store.points)
    labels = np.load(os.path.join(rec, "assets", "rerank_labels.npy"), allow_pickle=False)
    assert labels.tolist() == met.load_split(tree.info_dir, "train").labels.tolist()


def test_recognize_answers_with_the_confidence_knn_eval_verified(exported):
    from tfmet.serving import Recognizer

    tree, desc, rec, _ = exported
    with open(desc / "knn_results.json") as f:
        block = json.load(f)["rerank"]
    predictions = np.load(desc / "knn_predictions.npz")
    val = met.load_split(tree.info_dir, "val")
    train_labels = met.load_split(tree.info_dir, "train").labels
    val_local, train_local = read_local(desc, "val"), read_local(desc, "train")
    recognizer = Recognizer(str(rec))
    photos = []
    for path in met.image_paths(val, tree.image_root):
        with open(path, "rb") as f:
            photos.append(f.read())
    answers = recognizer.recognize(photos)
    assert any(answer.inliers for answer in answers)  # the verification found geometry
    assert recognizer.threshold == pytest.approx(block["threshold"]["value"], rel=1e-6)
    for row, answer in enumerate(answers):
        pred = int(predictions["val_pred"][row])
        assert answer.met_id == pred
        query = spatial.LocalFeatures(*val_local.image(row))
        expected = max(
            [0]
            + [
                spatial.inliers(
                    query,
                    spatial.LocalFeatures(*train_local.image(j)),
                    block["residual_threshold"],
                )
                for j in np.flatnonzero(train_labels == pred)  # every row is among the top 8
            ]
        )
        assert answer.inliers == expected
        verified = spatial.verified_confidence(
            predictions["val_conf"][row : row + 1], np.array([expected]), block["weight"],
            block["saturation"],
        )[0]  # fmt: skip
        assert answer.confidence == pytest.approx(verified, rel=1e-4)
        assert answer.accepted == (np.float32(answer.confidence) >= recognizer.threshold)
        assert json.loads(json.dumps(answer.to_json()))["inliers"] == expected  # plain types


def test_rerank_export_bad_input_is_one_line(exported, tmp_path):
    tree, desc, _, export = exported
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"k": 2, "t": 0.1, "dim": None}))
    done = _run(*export, f"--results_json={plain}", "--rerank=spatial", f"--out={tmp_path / 'x'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f'tfmet-export: error: {plain}: no spatial "rerank" block (run tfmet-knn-eval '
        "--rerank=spatial)"
    )
