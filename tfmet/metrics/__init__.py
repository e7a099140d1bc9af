"""Met benchmark metrics: GAP / GAP- / ACC as numpy functions and as streaming Keras metrics."""

from tfmet.metrics.keras_metrics import GlobalAveragePrecision, MetAccuracy
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
    "GlobalAveragePrecision",
    "MetAccuracy",
    "accuracy",
    "correct",
    "evaluate",
    "gap",
    "gap_minus",
    "precision_recall_curve",
    "ranking",
]
