"""The operating threshold against a direct numpy computation of its definitions."""

import numpy as np
import pytest

from tfmet.metrics import operating_point
from tfmet.retrieval import evaluation


def _direct(pred, conf, labels, t):
    """The definitions of docs/recognize.md, one threshold at a time."""
    pred, conf, labels = np.asarray(pred), np.asarray(conf), np.asarray(labels)
    accepted = conf >= t
    tp = np.sum(accepted & (pred == labels) & (labels != -1))
    n_acc = np.sum(accepted)
    precision = tp / n_acc if n_acc else 1.0
    n_met = np.sum(labels != -1)
    recall = tp / n_met if n_met else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_dis = np.sum(labels == -1)
    far = np.sum(accepted & (labels == -1)) / n_dis if n_dis else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "false_accept_rate": far}


def _brute_force(pred, conf, labels, target=None):
    candidates = sorted(set(np.asarray(conf, float).tolist())) + [np.nextafter(max(conf), np.inf)]
    scored = [(t, _direct(pred, conf, labels, t)) for t in candidates]
    if target is None:
        best = max(m["f1"] for _, m in scored)
        return [t for t, m in scored if m["f1"] == best][-1]
    return next(t for t, m in scored if m["precision"] >= target)


CASES = {
    # Ties: three queries share 0.7 (one right, one wrong, one distractor).
    "ties": (
        [1, 2, 3, 4, 5, 6, 7],
        [0.9, 0.7, 0.7, 0.7, 0.5, 0.3, 0.3],
        [1, 2, 9, -1, 5, -1, 7],
    ),
    "all_distractors": ([1, 2, 3], [0.8, 0.4, 0.4], [-1, -1, -1]),
    # Every Met query is answered wrong: no threshold has a true positive.
    "no_met_query_right": ([1, 2, 3, 4], [0.9, 0.6, 0.2, 0.5], [5, 6, 7, -1]),
    "random": (
        np.random.default_rng(0).integers(0, 5, 200),
        np.round(np.random.default_rng(1).random(200), 2),
        np.where(
            np.random.default_rng(2).random(200) < 0.3,
            -1,
            np.random.default_rng(3).integers(0, 5, 200),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", [None, 0.5, 0.8, 1.0])
def test_choose_threshold_matches_brute_force(case, target):
    pred, conf, labels = CASES[case]
    rule = "max_f1" if target is None else "target_precision"
    threshold, metrics = operating_point.choose_threshold(
        pred, conf, labels, rule=rule, target_precision=target
    )
    assert threshold == _brute_force(pred, conf, labels, target)
    expected = _direct(pred, conf, labels, threshold)
    for key in operating_point.KEYS:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)


def test_golden_values_with_ties():
    pred, conf, labels = CASES["ties"]
    # At 0.3 all 7 are accepted, TP = ids 1, 2, 5, 7: precision 4/7, recall 4/5, F1 2/3.
    threshold, metrics = operating_point.choose_threshold(pred, conf, labels)
    assert threshold == 0.3
    assert metrics == pytest.approx(
        {"precision": 4 / 7, "recall": 0.8, "f1": 2 / 3, "false_accept_rate": 1.0}
    )
    # At 0.5: the three tied 0.7 answers all count (ids 2 right, 3 wrong, distractor).
    assert operating_point.evaluate_threshold(pred, conf, labels, 0.5) == pytest.approx(
        {"precision": 0.6, "recall": 0.6, "f1": 0.6, "false_accept_rate": 0.5}
    )
    # Precision 0.8 is first reached at 0.9 (one right answer: precision 1.0).
    assert operating_point.choose_threshold(pred, conf, labels, "target_precision", 0.8)[0] == 0.9


def test_nothing_right_rejects_everything():
    for case in ("all_distractors", "no_met_query_right"):
        pred, conf, labels = CASES[case]
        threshold, metrics = operating_point.choose_threshold(pred, conf, labels)
        assert threshold > max(conf)
        assert metrics == {"precision": 1.0, "recall": 0.0, "f1": 0.0, "false_accept_rate": 0.0}


def test_bad_rule_and_target():
    with pytest.raises(ValueError, match="rule"):
        operating_point.choose_threshold([1], [0.5], [1], rule="best")
    with pytest.raises(ValueError, match="target_precision"):
        operating_point.choose_threshold([1], [0.5], [1], rule="target_precision")


def _split(rng, labels, centers, noise, source):
    labels = np.asarray(labels, np.int64)
    x = np.where(labels[:, None] >= 0, centers[np.maximum(labels, 0)], 0.0)
    x = x + noise * rng.normal(size=(labels.size, centers.shape[1]))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return evaluation.SplitData(x.astype(np.float32), labels, np.ones(labels.size, bool), source)


def test_knn_eval_reports_the_threshold_block_for_both_rules():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    data = {
        "train": _split(rng, np.repeat(np.arange(6), 2), centers, 0.2, "train"),
        "val": _split(rng, [0, 1, 2, 3, 4, 5, -1, -1, -1], centers, 0.9, "val"),
        "test": _split(rng, [0, 1, 2, 3, 4, 5, -1, -1], centers, 0.9, "test"),
    }
    lines = []
    for target in (None, 0.9):
        result = evaluation.knn_eval(
            data, raw=True, k=3, tau=5.0, target_precision=target, log=lines.append
        )
        block = result.to_json()["threshold"]
        rule = "max_f1" if target is None else "target_precision"
        value, val_metrics = operating_point.choose_threshold(
            *result.predictions["val"], rule=rule, target_precision=target
        )
        assert (block["rule"], block["value"], block["val"]) == (rule, value, val_metrics)
        assert block["test"] == pytest.approx(_direct(*result.predictions["test"], value))
        if target is not None:
            assert block["val"]["precision"] >= target
    assert any(line.startswith("threshold ") and " on test: " in line for line in lines)
