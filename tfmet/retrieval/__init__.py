"""Non-parametric recognition: PCA-whitening, ScaNN neighbour search, the kNN classifier, tuning."""

from tfmet.retrieval import recall
from tfmet.retrieval.index import BACKENDS, NeighborIndex, ScannConfig
from tfmet.retrieval.knn import KnnClassifier, knn_confidence
from tfmet.retrieval.pca import (
    PCAWhitening,
    apply_pca_whitening,
    l2_normalize_rows,
    pca_whitening,
)
from tfmet.retrieval.tuning import (
    DEFAULT_KS,
    DEFAULT_TAUS,
    TuningResult,
    tune,
    tune_on_neighbors,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_KS",
    "DEFAULT_TAUS",
    "KnnClassifier",
    "NeighborIndex",
    "PCAWhitening",
    "ScannConfig",
    "TuningResult",
    "apply_pca_whitening",
    "knn_confidence",
    "l2_normalize_rows",
    "pca_whitening",
    "recall",
    "tune",
    "tune_on_neighbors",
]
