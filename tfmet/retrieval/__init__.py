"""Non-parametric recognition: PCA-whitening, neighbour searchers, the kNN classifier, tuning."""

from tfmet.retrieval import recall
from tfmet.retrieval.knn import KnnClassifier, KnnSearch, knn_confidence
from tfmet.retrieval.pca import (
    PCAWhitening,
    apply_pca_whitening,
    l2_normalize_rows,
    pca_whitening,
)
from tfmet.retrieval.scann_build import ScannConfig
from tfmet.retrieval.searchers import (
    SEARCHERS,
    ExactSearcher,
    ScannSearcher,
    Searcher,
    load_searcher,
    make_searcher,
    searcher_class,
)
from tfmet.retrieval.tuning import (
    DEFAULT_KS,
    DEFAULT_TAUS,
    TuningResult,
    tune,
    tune_on_neighbors,
)

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TAUS",
    "SEARCHERS",
    "ExactSearcher",
    "KnnClassifier",
    "KnnSearch",
    "PCAWhitening",
    "ScannConfig",
    "ScannSearcher",
    "Searcher",
    "TuningResult",
    "apply_pca_whitening",
    "knn_confidence",
    "l2_normalize_rows",
    "load_searcher",
    "make_searcher",
    "pca_whitening",
    "recall",
    "searcher_class",
    "tune",
    "tune_on_neighbors",
]
