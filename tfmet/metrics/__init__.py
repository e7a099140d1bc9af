"""Met benchmark metrics: GAP / GAP- / ACC as numpy functions (the streaming Keras metrics are in
tfmet.metrics.keras_metrics: the package loads no TensorFlow, so tfmet-knn-eval's --help is fast).
"""

from tfmet.metrics.recognition import (
    DISTRACTOR,
    accuracy,
    correct,
    evaluate,
    gap,
    gap_minus,
    precision_recall_curve,
    ranking,
)

__all__ = [
    "DISTRACTOR",
    "accuracy",
    "correct",
    "evaluate",
    "gap",
    "gap_minus",
    "precision_recall_curve",
    "ranking",
]
