"""GAP, GAP- and accuracy of the Met benchmark (Ypsilantis et al., 2021): numpy in, float out.

Every query has a predicted database label `pred`, a confidence `conf` and a ground-truth label;
distractor queries (other art, non-art) have the label -1 and are always wrong, whatever `pred`.

- GAP (micro average precision): rank all queries by descending confidence; with rel_i = 1 iff
  the query at rank i is a Met query predicted right, GAP = (1 / M) sum_i P@i rel_i, M the number
  of Met (non-distractor) queries. GAP rewards confident right answers and penalises confident
  answers to distractors.
- GAP-: the same on the Met queries only (distractors removed before ranking).
- ACC: the fraction of Met queries predicted right.

Tie rule: the ranking is a *stable* sort by descending confidence, so queries of equal confidence
keep their input (query) order. The reference sorts with numpy's unstable quicksort, whose order of
ties is unspecified; this rule makes GAP deterministic and reproducible. When there is no Met query
(M = 0) every metric is 0.0, like an empty streaming metric.
"""

import numpy as np

DISTRACTOR = -1


def _as_vector(name, values):
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D array. Received: shape={np.shape(values)}")
    return array


def _check_labels(name, values):
    array = _as_vector(name, values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"`{name}` must hold integer labels. Received dtype {array.dtype}")
    return array.astype(np.int64)


def _check_inputs(pred, conf, labels):
    pred = _check_labels("pred", pred)
    labels = _check_labels("labels", labels)
    conf = _as_vector("conf", conf).astype(np.float64)
    if not pred.shape == conf.shape == labels.shape:
        raise ValueError(
            "`pred`, `conf` and `labels` must have the same length. Received: "
            f"{pred.shape[0]}, {conf.shape[0]}, {labels.shape[0]}"
        )
    if not np.all(np.isfinite(conf)):
        raise ValueError("`conf` must be finite. Received NaN or infinite confidences")
    return pred, conf, labels


def correct(pred, labels):
    """bool [n]: Met queries (label != -1) whose prediction equals the label."""
    labels = np.asarray(labels)
    return (labels != DISTRACTOR) & (np.asarray(pred) == labels)


def ranking(conf):
    """Query indices by descending confidence, ties in query order (the tie rule)."""
    return np.argsort(-np.asarray(conf, np.float64), kind="stable")


def _average_precision(rel_ranked, num_positives):
    if num_positives == 0:
        return 0.0
    hits = np.cumsum(rel_ranked)
    precision_at_i = hits / np.arange(1, rel_ranked.size + 1)
    return float(np.sum(precision_at_i * rel_ranked) / num_positives)


def gap(pred, conf, labels):
    """Global Average Precision over all queries, distractors included.

    Args:
      pred: int [n] predicted labels.
      conf: float [n] confidences (any finite values; only their order matters).
      labels: int [n] ground truth, -1 for distractors.

    Returns:
      float in [0, 1].
    """
    pred, conf, labels = _check_inputs(pred, conf, labels)
    rel = correct(pred, labels)[ranking(conf)]
    return _average_precision(rel, int(np.sum(labels != DISTRACTOR)))


def gap_minus(pred, conf, labels):
    """GAP on the Met queries only ("GAP-" / "GAP without distractors"); same arguments as `gap`."""
    pred, conf, labels = _check_inputs(pred, conf, labels)
    keep = labels != DISTRACTOR
    return gap(pred[keep], conf[keep], labels[keep])


def accuracy(pred, labels):
    """Top-1 accuracy on the Met queries (distractors ignored); 0.0 without Met queries."""
    pred = _check_labels("pred", pred)
    labels = _check_labels("labels", labels)
    if pred.shape != labels.shape:
        raise ValueError(
            "`pred` and `labels` must have the same length. Received: "
            f"{pred.shape[0]}, {labels.shape[0]}"
        )
    count = int(np.sum(labels != DISTRACTOR))
    return float(np.sum(correct(pred, labels)) / count) if count else 0.0


def evaluate(pred, conf, labels):
    """{"gap", "gap_minus", "acc"} as fractions in [0, 1]."""
    return {
        "gap": gap(pred, conf, labels),
        "gap_minus": gap_minus(pred, conf, labels),
        "acc": accuracy(pred, labels),
    }


def precision_recall_curve(pred, conf, labels):
    """The curve whose area is GAP: precision and recall after each rank (tie rule applied).

    Returns:
      (precision, recall, conf_ranked), float64 arrays [n]; recall is over the M Met queries.
    """
    pred, conf, labels = _check_inputs(pred, conf, labels)
    order = ranking(conf)
    hits = np.cumsum(correct(pred, labels)[order])
    num_positives = max(int(np.sum(labels != DISTRACTOR)), 1)
    precision = hits / np.arange(1, hits.size + 1)
    return precision, hits / num_positives, conf[order]
