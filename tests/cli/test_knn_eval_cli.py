"""tfmet-knn-eval end to end on a tiny generated Met tree, and its bad-input errors.

Most runs parse the flags and call `main` in this process (fast); the absl flags are global, so
no other tfmet CLI module may be imported in-process by the same test session.
"""

import json
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tensorboard.backend.event_processing import event_accumulator

from tests.kit import cli as kit_cli
from tests.kit.met_tree import write_met_tree
from tests.kit.references import rule_by_loop as _rule_by_loop
from tests.kit.references import unit as _unit
from tfmet import metrics
from tfmet.cli import knn_eval
from tfmet.data.descriptor_store import write_store
from tfmet.retrieval import DEFAULT_TAUS

DIM = 16


def run_cli(*args):
    """Parses `args` like the console script and runs main; returns the exit code."""
    flags.FLAGS.unparse_flags()
    argv = flags.FLAGS(["tfmet-knn-eval", *map(str, args)])
    try:
        knn_eval.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def met(tmp_path_factory):
    """A Met tree (JSON + images) and descriptors that cluster by exhibit."""
    root = tmp_path_factory.mktemp("met")
    tree = write_met_tree(
        root, num_exhibits=6, images_per_exhibit=3, met_queries=5, other_queries=3, noart_queries=3
    )
    rng = np.random.default_rng(0)
    centres = {e["id"]: rng.normal(size=DIM) for e in tree.train}
    descriptors = {}
    for split in ("train", "val", "test"):
        rows = []
        for entry in tree.entries(split):
            label = entry.get("id", entry.get("MET_id"))
            centre = centres[label] if label is not None else rng.normal(size=DIM)
            rows.append(centre + rng.normal(scale=0.9, size=DIM) + 0.5)
        descriptors[split] = _unit(np.array(rows))
    return tree, descriptors


def _labels(tree, split):
    return np.array([e.get("id", e.get("MET_id", -1)) for e in tree.entries(split)])


def _write_stores(directory, descriptors, valid=None):
    valid = valid or {}
    for split, x in descriptors.items():
        write_store(directory, split, x, valid=valid.get(split))


def _expected(tree, descriptors, k, tau, valid=None):
    """Independent pipeline (raw descriptors): numpy brute force + the rule in a loop."""
    valid = valid or {}
    keep = valid.get("train", np.ones(len(descriptors["train"]), bool))
    database, db_labels = descriptors["train"][keep], _labels(tree, "train")[keep]
    out = {}
    for split in ("val", "test"):
        queries, labels = descriptors[split], _labels(tree, split)
        ok = valid.get(split, np.ones(len(labels), bool))
        scores = queries.astype(np.float64) @ database.T.astype(np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        pred, conf = _rule_by_loop(
            np.take_along_axis(scores, order, 1), db_labels[order], len(set(db_labels)), tau
        )
        pred, conf = np.where(ok, pred, -1), np.where(ok, conf, 0.0)
        out[split] = (metrics.evaluate(pred, conf, labels), pred, conf)
    return out


def test_autotune_raw_end_to_end(met, tmp_path):
    tree, descriptors = met
    _write_stores(tmp_path, descriptors)
    code = run_cli(tmp_path, "--info_dir", tree.info_dir, "--autotune", "--raw", "--log", "run")
    assert code == 0
    results = json.loads((tmp_path / "knn_results_run.json").read_text())
    assert results["dim"] is None and results["backend"] == "exact"
    # The grid skips k > 18 (the database size) and keeps the reference's taus.
    assert results["grid"]["ks"] == [1, 2, 3, 5, 7, 10, 15]
    assert results["grid"]["taus"] == list(DEFAULT_TAUS)
    # Independent grid: the first maximum in K-outer order is the chosen point.
    grid = np.array(
        [
            [_expected(tree, descriptors, k, t)["val"][0]["gap"] for t in DEFAULT_TAUS]
            for k in results["grid"]["ks"]
        ]
    )
    np.testing.assert_allclose(results["grid"]["val_gap"], grid, rtol=1e-9)
    best = np.unravel_index(np.argmax(grid), grid.shape)
    assert results["k"] == results["grid"]["ks"][best[0]] and results["t"] == DEFAULT_TAUS[best[1]]
    expected = _expected(tree, descriptors, results["k"], results["t"])
    for split in ("val", "test"):
        assert results[split] == pytest.approx(expected[split][0], rel=1e-9)
        assert all(0.0 <= v <= 1.0 for v in results[split].values())
    assert set(results["timings_s"]) == {
        "index_build", "val_search", "tuning", "val_eval", "test_search"
    }  # fmt: skip
    saved = np.load(tmp_path / "knn_predictions_run.npz")
    np.testing.assert_array_equal(saved["test_pred"], expected["test"][1])
    np.testing.assert_allclose(saved["test_conf"], expected["test"][2], rtol=1e-6)
    log = (tmp_path / "log_knn_run.txt").read_text()
    assert "expname: EXP_d512AT" in log
    test = results["test"]
    assert (
        f"test: GAP {test['gap']:.6f}, GAP- {test['gap_minus']:.6f}, ACC {test['acc']:.6f}"
        in log.splitlines()
    )

    events = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard" / "knn_eval_run"), size_guidance={"tensors": 0, "images": 0}
    )
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["images"])
    assert {"tuning/val_gap_grid", "test/precision_recall", "test/gap", "val/acc"} <= tags
    assert "test/correct_vs_confidence/pr_curves" in tags
    gap_event = events.Tensors("test/gap")[0]
    logged_gap = float(tf.make_ndarray(gap_event.tensor_proto))
    assert logged_gap == pytest.approx(results["test"]["gap"], rel=1e-6)


def test_pcaw_fixed_k_t_and_invalid_rows(met, tmp_path):
    tree, descriptors = met
    descriptors = {split: x.copy() for split, x in descriptors.items()}
    valid = {split: np.ones(len(x), bool) for split, x in descriptors.items()}
    valid["train"][4] = False
    valid["test"][2] = False
    descriptors["train"][4] = np.nan  # unreadable image: never read as a descriptor
    descriptors["test"][2] = np.nan
    _write_stores(tmp_path, descriptors, valid)
    code = run_cli(tmp_path, "--info_dir", tree.info_dir, "-d", 8, "-k", 3, "-t", 10)
    assert code == 0
    results = json.loads((tmp_path / "knn_results.json").read_text())
    assert (results["k"], results["t"], results["dim"], results["grid"]) == (3, 10.0, 8, None)
    assert results["counts"]["invalid"] == {"train": 1, "val": 0, "test": 1}
    assert results["counts"]["database"] == 17
    # Independent PCA-whitening (SVD) of the valid database rows; similarities do not depend
    # on the eigenvectors' signs.
    database = descriptors["train"][valid["train"]].astype(np.float64)
    mean = database.mean(axis=0)
    _, s, vt = np.linalg.svd(database - mean, full_matrices=False)
    projection = vt[:8].T / np.sqrt(s[:8] ** 2 / len(database))
    whitened = {
        split: _unit(np.nan_to_num(x - mean, nan=1.0) @ projection)
        for split, x in descriptors.items()
    }
    expected = _expected(tree, whitened, 3, 10.0, valid)
    for split in ("val", "test"):
        assert results[split] == pytest.approx(expected[split][0], rel=1e-5)
    saved = np.load(tmp_path / "knn_predictions.npz")
    assert saved["test_pred"][2] == -1 and saved["test_conf"][2] == 0.0


def test_reference_pickle_and_val_eval(met, tmp_path):
    tree, descriptors = met
    with open(tmp_path / "descriptors.pkl", "wb") as f:
        pickle.dump({f"{s}_descriptors": x for s, x in descriptors.items()}, f)
    code = run_cli(
        tmp_path, "--info_dir", tree.info_dir, "--raw", "-k", 2, "-t", 5, "--val_eval",
        "--results_json", tmp_path / "out" / "r.json",
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "out" / "r.json").read_text())
    assert results["test"] is None and "test_search" not in results["timings_s"]
    assert results["val"] == pytest.approx(_expected(tree, descriptors, 2, 5.0)["val"][0])


def _error(capsys, code):
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


def test_bad_input(met, tmp_path, capsys):
    tree, descriptors = met
    info = tree.info_dir

    short = tmp_path / "short"
    _write_stores(short, {**descriptors, "val": descriptors["val"][:-1]})
    line = _error(capsys, run_cli(short, "--info_dir", info, "--autotune"))
    assert "val_descriptors.npy: 10 descriptors" in line and "valset.json lists 11" in line

    nan = tmp_path / "nan"
    broken = descriptors["train"].copy()
    broken[5, 0] = np.nan
    _write_stores(nan, {**descriptors, "train": broken})
    line = _error(capsys, run_cli(nan, "--info_dir", info, "--autotune"))
    assert "train_descriptors.npy: row 5 is NaN" in line

    good = tmp_path / "good"
    _write_stores(good, descriptors)
    line = _error(capsys, run_cli(good, "--info_dir", info, "--autotune", "-d", 64))
    assert "--dim 64 is larger than the descriptor dimension 16" in line
    line = _error(capsys, run_cli(good, "--info_dir", info, "-k", 3))
    assert "--k and --t are required" in line
    line = _error(capsys, run_cli(good, "--info_dir", info, "--autotune", "--rerank_top", 0))
    assert "--rerank_top must be a positive integer, got 0" in line

    empty_info = tmp_path / "empty_info"
    empty_info.mkdir()
    for name in ("MET_database.json", "testset.json"):
        (empty_info / name).write_text(open(os.path.join(info, name)).read())
    (empty_info / "valset.json").write_text("[]")
    empty = tmp_path / "empty"
    _write_stores(empty, {**descriptors, "val": descriptors["val"][:0]})
    line = _error(capsys, run_cli(empty, "--info_dir", empty_info, "--autotune"))
    assert "validation set is empty" in line

    no_test = tmp_path / "no_test"
    no_test.mkdir()
    for name in ("MET_database.json", "valset.json"):
        (no_test / name).write_text(open(os.path.join(info, name)).read())
    line = _error(capsys, run_cli(good, "--info_dir", no_test, "--autotune"))
    assert "testset.json" in line and "not found" in line

    line = _error(capsys, run_cli(tmp_path / "nowhere", "--info_dir", info, "--autotune"))
    assert "no descriptors" in line


@pytest.mark.slow
def test_console_program_exit_code(met, tmp_path):
    """The real program (absl app.run) in a subprocess: one error line, exit code 2."""
    tree, _ = met
    done = kit_cli.run_cli("knn_eval", tmp_path, "--info_dir", tree.info_dir)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("tfmet-knn-eval: error")]
    assert len(errors) == 1 and "no descriptors" in errors[0]


def test_scann_below_min_recall_falls_back_to_exact(met, tmp_path):
    tree, descriptors = met
    _write_stores(tmp_path, descriptors)
    code = run_cli(
        tmp_path, "--info_dir", tree.info_dir, "--raw", "-k", 3, "-t", 10,
        "--backend", "scann", "--min_recall", 2,
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "knn_results.json").read_text())
    search = results["search"]
    assert results["backend"] == "scann" and search["backend"] == "exact"
    assert search["config"] is None and search["k"] == 3 and search["recall"] == 1.0
    assert "using exact search" in search["reason"]
    assert "using exact search" in (tmp_path / "log_knn.txt").read_text()
    expected = _expected(tree, descriptors, 3, 10.0)
    for split in ("val", "test"):
        assert results[split] == pytest.approx(expected[split][0], rel=1e-9)


def _recorded_stores(directory, tree, descriptors, weights=None):
    """Stores that record their rows' paths and labels, as tfmet-extract writes them."""
    from tfmet.data import met as met_data

    for split, x in descriptors.items():
        gt = met_data.load_split(tree.info_dir, split)
        write_store(
            directory,
            split,
            x,
            paths=gt.paths,
            labels=gt.labels.tolist(),
            weights_sha256=(weights or {}).get(split, "w0"),
            backbone="r18",
        )


def _copy_info(tree, directory):
    directory.mkdir()
    for name in os.listdir(tree.info_dir):
        (directory / name).write_text(open(os.path.join(tree.info_dir, name)).read())
    return directory


def test_stores_must_match_the_ground_truth_row_by_row(met, tmp_path, capsys):
    tree, descriptors = met
    good = tmp_path / "good"
    _recorded_stores(good, tree, descriptors)
    assert run_cli(good, "--info_dir", tree.info_dir, "-k", 1, "-t", 1, "--raw") == 0
    capsys.readouterr()

    # The database JSON reversed after extraction: same count, every row another image.
    reversed_info = _copy_info(tree, tmp_path / "reversed")
    database = json.loads((reversed_info / "MET_database.json").read_text())
    (reversed_info / "MET_database.json").write_text(json.dumps(database[::-1]))
    line = _error(capsys, run_cli(good, "--info_dir", reversed_info, "-k", 1, "-t", 1, "--raw"))
    assert "train_manifest.json: row 0 is" in line and "MET_database.json lists" in line

    # A relabelled query: same image, another exhibit.
    relabelled = _copy_info(tree, tmp_path / "relabelled")
    valset = json.loads((relabelled / "valset.json").read_text())
    first = next(i for i, e in enumerate(valset) if "MET_id" in e)
    valset[first]["MET_id"] = 10**6
    (relabelled / "valset.json").write_text(json.dumps(valset))
    line = _error(capsys, run_cli(good, "--info_dir", relabelled, "-k", 1, "-t", 1, "--raw"))
    assert f"val_manifest.json: row {first} has label" in line

    # Train and queries extracted with different weights.
    mixed = tmp_path / "mixed"
    _recorded_stores(mixed, tree, descriptors, weights={"test": "w1"})
    line = _error(capsys, run_cli(mixed, "--info_dir", tree.info_dir, "-k", 1, "-t", 1, "--raw"))
    assert "test_manifest.json: extracted with weights_sha256='w1'" in line
    assert "weights_sha256='w0'" in line

    # A hand-edited manifest: strings where booleans belong are refused, not read as True.
    edited = tmp_path / "edited"
    _recorded_stores(edited, tree, descriptors)
    path = edited / "val_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["valid"] = ["false"] * manifest["count"]
    path.write_text(json.dumps(manifest))
    line = _error(capsys, run_cli(edited, "--info_dir", tree.info_dir, "-k", 1, "-t", 1, "--raw"))
    assert "val_manifest.json: 'valid' entry 0 is 'false', not true or false" in line


def test_autotune_at_the_default_dim_on_fewer_images_whitens_to_their_rank(met, tmp_path):
    """The documented `tfmet-knn-eval DESC --info_dir ... --autotune` (-d 512) on 18 database
    images of 600 dimensions: 18 descriptors whiten to at most 17 dimensions, and that is what
    runs (said in the log, recorded as the results' dim) instead of an error about eigenvalues."""
    tree, descriptors = met
    rng = np.random.default_rng(1)
    wide = {
        split: _unit(np.concatenate([x, 0.1 * rng.normal(size=(len(x), 600 - DIM))], axis=1))
        for split, x in descriptors.items()
    }
    _write_stores(tmp_path, wide)
    code = run_cli(tmp_path, "--info_dir", tree.info_dir, "--autotune")
    assert code == 0
    results = json.loads((tmp_path / "knn_results.json").read_text())
    assert results["dim"] == 17 and results["counts"]["database"] == 18
    log = (tmp_path / "log_knn.txt").read_text()
    assert (
        "PCA-whitening to 17 dimensions, not --dim 512: the covariance of the 18 database "
        "descriptors has only 17 non-zero eigenvalues" in log
    )
    # Independent PCA-whitening (SVD) to the 17 components, at the chosen k and tau.
    database = wide["train"].astype(np.float64)
    mean = database.mean(axis=0)
    _, s, vt = np.linalg.svd(database - mean, full_matrices=False)
    projection = vt[:17].T / np.sqrt(s[:17] ** 2 / len(database))
    whitened = {split: _unit((x - mean) @ projection) for split, x in wide.items()}
    expected = _expected(tree, whitened, results["k"], results["t"])
    assert results["test"] == pytest.approx(expected["test"][0], rel=1e-5)
