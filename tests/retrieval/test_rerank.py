"""Spatial re-ranking in knn-eval: the inliers, the tuned rule, the results block, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.kit.cli import REPO
from tfmet.data.descriptor_store import LocalStore
from tfmet.retrieval import evaluation, rerank, spatial
from tfmet.retrieval.knn import KnnClassifier

NUM, DIM = 40, 8


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(images):
    """A `LocalStore` of [(points, descriptors)] with NUM features each."""
    return LocalStore(
        descriptors=np.stack([d for _, d in images]).astype(np.float16),
        points=np.stack([p for p, _ in images]).astype(np.float16),
        scores=np.ones((len(images), NUM), np.float32),
        counts=np.full(len(images), NUM, np.int16),
        spec={"num": NUM, "dim": DIM, "seed": 0, "local_dim": DIM},
    )


@pytest.fixture(scope="module")
def world():
    """3 exhibits (2 database images each); queries: photos of them (their local features
    under a zoom + shift) and distractors (the global descriptor close to an exhibit's, the
    local features unrelated)."""
    rng = np.random.default_rng(0)
    exhibit_global = _unit(rng, 3, 6)
    exhibit_local = [(rng.uniform(0.1, 0.9, (NUM, 2)), _unit(rng, NUM, DIM)) for _ in range(3)]
    database = np.repeat(exhibit_global, 2, axis=0) + 0.05 * rng.normal(size=(6, 6))
    train = evaluation.SplitData(
        database / np.linalg.norm(database, axis=1, keepdims=True),
        np.repeat([10, 11, 12], 2),
        np.ones(6, bool),
        "train",
    )
    train_local = _store([exhibit_local[i // 2] for i in range(6)])

    def queries(n_photos, n_distractors, seed):
        r = np.random.default_rng(seed)
        rows, labels, local = [], [], []
        for i in range(n_photos + n_distractors):
            e = i % 3
            rows.append(exhibit_global[e] + 0.2 * r.normal(size=6))
            if i < n_photos:
                points, rows_local = exhibit_local[e]
                local.append((0.5 * points + 0.2, rows_local))  # zoomed out and shifted
                labels.append(10 + e)
            else:
                local.append((r.uniform(0, 1, (NUM, 2)), _unit(r, NUM, DIM)))
                labels.append(-1)
        g = np.asarray(rows)
        split = evaluation.SplitData(
            g / np.linalg.norm(g, axis=1, keepdims=True),
            np.asarray(labels),
            np.ones(len(labels), bool),
            "q",
        )
        return split, _store(local)

    val, val_local = queries(6, 6, 1)
    test, test_local = queries(6, 6, 2)
    return train, train_local, {"val": val, "test": test}, {"val": val_local, "test": test_local}


def test_best_inliers_equal_the_verification_of_each_candidate(world):
    train, train_local, splits, local = world
    classifier = KnnClassifier(2, 0.1).fit(train.descriptors, train.labels)
    split = splits["val"]
    pred, _ = classifier.predict(split.descriptors)
    counts, pairs = rerank.best_inliers(
        classifier, split, local["val"], pred, (train.labels, train_local, np.arange(6)), 4,
        spatial.DEFAULT_THRESHOLD,
    )  # fmt: skip
    # Independent: the top 4 by numpy brute force, verified one by one.
    order = np.argsort(-(split.descriptors @ train.descriptors.T), axis=1)[:, :4]
    expected, expected_pairs = [], 0
    for row in range(len(pred)):
        candidates = [j for j in order[row] if train.labels[j] == pred[row]]
        expected_pairs += len(candidates)
        query = spatial.LocalFeatures(*local["val"].image(row))
        expected.append(max(
            [spatial.inliers(query, spatial.LocalFeatures(*train_local.image(j)))
             for j in candidates] or [0]
        ))  # fmt: skip
    np.testing.assert_array_equal(counts, expected)
    assert pairs == expected_pairs
    assert (counts[:6] == NUM).all() and (counts[6:] < spatial.MIN_MATCHES + 3).all()


def test_knn_eval_reports_the_reranked_decision_beside_the_global_one(world):
    train, train_local, splits, local = world
    data = {"train": train, **splits}
    spec = rerank.SpatialRerank({"train": train_local, **local}, top=4)
    result = evaluation.knn_eval(data, raw=True, k=2, tau=0.1, rerank=spec)
    block = result.to_json()["rerank"]
    assert block["method"] == "spatial" and block["top"] == 4
    # The global decision ranks some distractors above photos; verification puts every photo
    # (40 inliers) above every distractor (few), so GAP reaches ACC's ceiling.
    assert result.test["gap"] < block["test"]["gap"] == pytest.approx(1.0)
    assert block["test"]["acc"] == result.test["acc"]
    assert block["weight"] > 0  # the first of the grid's best on val
    assert block["threshold"]["test"]["precision"] == 1.0
    json.dumps(result.to_json())  # the results file


def test_rerank_needs_every_splits_local_features(world):
    train, train_local, splits, local = world
    data = {"train": train, **splits}
    with pytest.raises(ValueError, match="needs the local features of train"):
        evaluation.knn_eval(data, raw=True, k=2, tau=0.1, rerank=rerank.SpatialRerank(local))
    for top in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match="`top` must be a positive integer"):
            rerank.SpatialRerank({"train": train_local, **local}, top=top)
    with pytest.raises(ValueError, match="must be None or a SpatialRerank"):
        evaluation.knn_eval(data, raw=True, k=2, tau=0.1, rerank="spatial")
    with pytest.raises(ValueError, match="`search` must be a KnnSearch. Received: 'scann'"):
        evaluation.knn_eval(data, raw=True, k=2, tau=0.1, search="scann")


@pytest.mark.slow
def test_cli_reranks_a_store_extracted_with_local_features(tmp_path):
    from tests.kit.met_tree import write_met_tree

    tree = write_met_tree(tmp_path / "met", num_exhibits=4, images_per_exhibit=2)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    extract = ["tfmet.cli.extract", f"--info_dir={tree.info_dir}",
               f"--image_root={tree.image_root}", "--backbone=resnet_tiny",
               "--noprogress"]  # fmt: skip
    done = run(*extract, f"--output_dir={tmp_path / 'plain'}")
    assert done.returncode == 0, done.stderr[-2000:]
    knn = ["tfmet.cli.knn_eval", f"--info_dir={tree.info_dir}", "--raw", "-k", "2", "-t", "0.1",
           "--rerank=spatial"]  # fmt: skip
    refused = run(*knn, str(tmp_path / "plain"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"tfmet-knn-eval: error: {tmp_path / 'plain' / 'train_manifest.json'}: the store has no "
        "local features (extract with --local_features N)"
    )
    done = run(*extract, f"--output_dir={tmp_path / 'local'}", "--local_features=30")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(*knn, str(tmp_path / "local"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "local" / "knn_results.json").read_text())
    block = results["rerank"]
    assert block["top"] == 20 and block["test"]["acc"] == results["test"]["acc"]
    assert block["val"]["gap"] >= results["val"]["gap"]  # weight 0 is in the grid
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == (
        f"test re-ranked (spatial, top 20): GAP {block['test']['gap']:.4f}, "
        f"GAP- {block['test']['gap_minus']:.4f}, ACC {block['test']['acc']:.4f}"
    )
