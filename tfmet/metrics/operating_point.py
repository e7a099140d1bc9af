"""An operating threshold on the kNN confidence: accept an answer or say "not in the collection".

Definitions (per query: predicted Met id `pred`, confidence `conf`, label, -1 for distractors):
- a query is accepted when `conf >= threshold`;
- TP = accepted and `pred == label` (distractors are never TP);
- precision = TP / accepted (1.0 when nothing is accepted: no wrong answer was given);
- recall = TP / number of Met queries (0.0 without Met queries);
- F1 = 2 precision recall / (precision + recall) (0.0 when both are 0);
- false-accept rate = accepted distractors / distractors (0.0 without distractors).

Candidate thresholds are the distinct confidences plus one just above the largest (reject all).
`choose_threshold` picks, on val, either the candidate of maximal F1 (ties: the highest such
threshold, i.e. the fewest accepted) or the lowest candidate whose precision >= a target.
"""

import numpy as np

from tfmet.metrics import recognition as met_metrics

RULES = ("max_f1", "target_precision")
KEYS = ("precision", "recall", "f1", "false_accept_rate")


def _f1(precision, recall):
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def _counts_at(pred, conf, labels, thresholds):
    """(accepted, TP, accepted distractors) per threshold, each [T]."""
    right = met_metrics.correct(pred, labels)
    distractor = np.asarray(labels) == met_metrics.DISTRACTOR
    order = np.argsort(conf, kind="stable")
    sorted_conf = np.asarray(conf, np.float64)[order]
    # Number of queries with conf >= t is n - (number with conf < t).
    below = np.searchsorted(sorted_conf, thresholds, side="left")
    cum_right = np.concatenate([[0], np.cumsum(right[order])])
    cum_distractor = np.concatenate([[0], np.cumsum(distractor[order])])
    n = sorted_conf.size
    return n - below, cum_right[n] - cum_right[below], cum_distractor[n] - cum_distractor[below]


def metrics_at(pred, conf, labels, thresholds):
    """Precision, recall, F1 and false-accept rate (dict of float64 [T]) at each threshold."""
    labels = np.asarray(labels)
    thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
    accepted, tp, accepted_distractors = _counts_at(pred, conf, labels, thresholds)
    num_distractors = int(np.sum(labels == met_metrics.DISTRACTOR))
    num_met = labels.size - num_distractors
    precision = np.where(accepted > 0, tp / np.maximum(accepted, 1), 1.0)
    recall = tp / num_met if num_met else np.zeros(thresholds.shape)
    far = accepted_distractors / num_distractors if num_distractors else np.zeros(thresholds.shape)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "false_accept_rate": far,
    }


def evaluate_threshold(pred, conf, labels, threshold):
    """The four metrics at one threshold, as plain floats."""
    values = metrics_at(pred, conf, labels, [threshold])
    return {key: float(values[key][0]) for key in KEYS}


def candidate_thresholds(conf):
    """Distinct confidences (ascending) and one just above the largest (nothing accepted)."""
    values = np.unique(np.asarray(conf, np.float64))
    top = values[-1] if values.size else 0.0
    return np.append(values, np.nextafter(top, np.inf))


def choose_threshold(pred, conf, labels, rule="max_f1", target_precision=None):
    """The operating threshold chosen on (val) predictions; see the module docstring.

    Args:
      pred, conf, labels: per-query predicted id, confidence and label (-1 for distractors).
      rule: "max_f1" or "target_precision".
      target_precision: with "target_precision", the precision to reach (0 < P <= 1).

    Returns:
      (threshold float, metrics dict at that threshold).
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {RULES}. Received: {rule!r}")
    if rule == "target_precision" and not (
        target_precision is not None and 0.0 < target_precision <= 1.0
    ):
        raise ValueError(f"`target_precision` must be in (0, 1]. Received: {target_precision}")
    thresholds = candidate_thresholds(conf)
    values = metrics_at(pred, conf, labels, thresholds)
    if rule == "max_f1":
        f1 = values["f1"]
        index = int(np.flatnonzero(f1 == f1.max())[-1])
    else:
        # The last candidate accepts nothing and has precision 1.0, so one always qualifies.
        index = int(np.flatnonzero(values["precision"] >= target_precision)[0])
    threshold = float(thresholds[index])
    return threshold, {key: float(values[key][index]) for key in KEYS}


def threshold_block(rule, threshold, val_metrics, test_metrics=None):
    """The results JSON's "threshold" entry."""
    return {"value": threshold, "rule": rule, "val": val_metrics, "test": test_metrics}
