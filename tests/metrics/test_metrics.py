"""GAP / GAP- / ACC: hand-made cases, an independent rank-counting definition, the tie rule."""

import numpy as np
import pytest

from tfmet import metrics

# Six queries, two distractors (-1). Ranked by confidence: q5 (distractor), q0 right, q1
# (distractor), q2 right, q3 wrong, q4 right -> rel 0 1 0 1 0 1 over M = 4 Met queries.
LABELS = [5, -1, 7, 5, 9, -1]
PRED = [5, 3, 7, 4, 9, 2]
CONF = [0.9, 0.8, 0.7, 0.6, 0.5, 0.95]


def test_hand_made_case():
    # GAP = (P@2 + P@4 + P@6) / 4 = (1/2 + 2/4 + 3/6) / 4.
    assert metrics.gap(PRED, CONF, LABELS) == pytest.approx(0.375, abs=1e-15)
    # GAP-: Met queries only, ranked q0 q2 q3 q4 -> rel 1 1 0 1: (1 + 1 + 3/4) / 4.
    assert metrics.gap_minus(PRED, CONF, LABELS) == pytest.approx(0.6875, abs=1e-15)
    assert metrics.accuracy(PRED, LABELS) == pytest.approx(0.75, abs=1e-15)
    assert metrics.evaluate(PRED, CONF, LABELS) == pytest.approx(
        {"gap": 0.375, "gap_minus": 0.6875, "acc": 0.75}
    )


def test_distractor_is_wrong_even_when_pred_is_minus_one():
    # A distractor "predicted" -1 is still wrong; only the Met query counts: GAP = P@2 / 1.
    assert metrics.gap([-1, 3], [0.9, 0.1], [-1, 3]) == pytest.approx(0.5)
    assert metrics.gap_minus([-1, 3], [0.9, 0.1], [-1, 3]) == pytest.approx(1.0)


def test_tie_rule_keeps_query_order():
    labels = [1, 2, 3]
    pred = [0, 2, 3]  # q0 wrong, q1 and q2 right, all tied
    # Query order: rel 0 1 1 -> (1/2 + 2/3) / 3 = 7/18.
    assert metrics.gap(pred, [0.5] * 3, labels) == pytest.approx(7 / 18, abs=1e-15)
    # The same queries listed with the wrong one last: rel 1 1 0 -> (1 + 1) / 3.
    assert metrics.gap(pred[::-1], [0.5] * 3, labels[::-1]) == pytest.approx(2 / 3, abs=1e-15)
    # A tied distractor listed first is ranked first.
    assert metrics.gap([9, 4], [0.3, 0.3], [-1, 4]) == pytest.approx(0.5)
    assert metrics.gap([4, 9], [0.3, 0.3], [4, -1]) == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.ranking([0.2, 0.5, 0.2, 0.5]), [1, 3, 0, 2])


def _gap_by_counting(pred, conf, labels, drop_distractors=False):
    """GAP without sorting: the rank of query i is 1 + #(higher conf) + #(equal conf, earlier)."""
    pred, conf, labels = map(np.asarray, (pred, conf, labels))
    if drop_distractors:
        keep = labels != -1
        pred, conf, labels = pred[keep], conf[keep], labels[keep]
    n = len(labels)
    right = [labels[i] != -1 and pred[i] == labels[i] for i in range(n)]
    rank = [
        1 + sum(conf[j] > conf[i] or (conf[j] == conf[i] and j < i) for j in range(n))
        for i in range(n)
    ]
    total = 0.0
    for i in range(n):
        if right[i]:
            hits = sum(right[j] and rank[j] <= rank[i] for j in range(n))
            total += hits / rank[i]
    met = sum(labels != -1)
    return total / met if met else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_against_counting_definition(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.integers(0, 5, n)
    labels[rng.random(n) < 0.4] = -1
    pred = np.where(rng.random(n) < 0.5, labels, rng.integers(0, 5, n))
    pred[labels == -1] = rng.integers(0, 5, int(np.sum(labels == -1)))
    conf = np.round(rng.random(n), 1)  # many ties
    assert metrics.gap(pred, conf, labels) == pytest.approx(_gap_by_counting(pred, conf, labels))
    assert metrics.gap_minus(pred, conf, labels) == pytest.approx(
        _gap_by_counting(pred, conf, labels, drop_distractors=True)
    )
    met = labels != -1
    assert metrics.accuracy(pred, labels) == pytest.approx(np.mean(pred[met] == labels[met]))


def test_perfect_and_empty():
    assert metrics.gap([1, 2], [0.1, 0.2], [1, 2]) == 1.0
    assert metrics.gap([1], [0.1], [-1]) == 0.0  # no Met query
    assert metrics.accuracy([], []) == 0.0


def test_precision_recall_curve_area_is_gap():
    precision, recall, ranked = metrics.precision_recall_curve(PRED, CONF, LABELS)
    np.testing.assert_allclose(recall, [0, 0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(precision, [0, 1 / 2, 1 / 3, 2 / 4, 2 / 5, 3 / 6])
    np.testing.assert_allclose(ranked, sorted(CONF, reverse=True))
    area = np.sum(precision * np.diff(recall, prepend=0.0))
    assert area == pytest.approx(metrics.gap(PRED, CONF, LABELS))


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        metrics.gap([1, 2], [0.1], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        metrics.gap([1], [np.nan], [1])
    with pytest.raises(ValueError, match="1-D"):
        metrics.gap(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="integer labels"):
        metrics.accuracy([0.5], [1])
