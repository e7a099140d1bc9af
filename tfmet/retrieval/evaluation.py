"""The Met kNN evaluation pipeline behind `tfmet-knn-eval`: load, PCA-whiten, tune, evaluate.

Descriptors come from tfmet descriptor stores (`<dir>/<split>_descriptors.npy` + manifest) or,
failing those, the reference's `<dir>/descriptors.pkl` (read with the restricted unpickler).
Labels come from the Met ground truth (`tfmet.data.met.load_split`). Rows a store marks invalid
(unreadable images) are left out of the database and, as queries, count as wrong answers with
prediction -1 and confidence 0 (ranked last).
"""

import contextlib
import dataclasses
import os
import tempfile
import time

import numpy as np

from tfmet.data import descriptor_store as store
from tfmet.data import met
from tfmet.io.safe_pickle import load_reference_descriptors
from tfmet.metrics import operating_point, recognition
from tfmet.retrieval import rerank as rerank_lib
from tfmet.retrieval import spatial, tuning
from tfmet.retrieval.knn import KnnSearch, check_finite
from tfmet.retrieval.pca import PCAWhitening

SPLITS = ("train", "val", "test")
PICKLE_NAME = "descriptors.pkl"
PICKLE_KEYS = {split: f"{split}_descriptors" for split in SPLITS}
EXACT = KnnSearch()


@dataclasses.dataclass
class SplitData:
    """One split: descriptors [n, d] (may be a memmap), labels int64 [n], valid bool [n]."""

    descriptors: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    source: str

    def __post_init__(self):
        n = self.descriptors.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(
                f"{self.source}: {n} descriptors but {self.labels.size} labels; the descriptor "
                "file and the ground truth must list the same images"
            )
        if self.valid.shape != (n,):
            raise ValueError(f"{self.source}: validity mask has {self.valid.size} entries, not {n}")

    @property
    def all_valid(self):
        return bool(np.all(self.valid))

    def valid_descriptors(self):
        return self.descriptors if self.all_valid else np.asarray(self.descriptors)[self.valid]


def _read_descriptors(directory, splits):
    """{split: (descriptors, valid, source, manifest)} from stores, else from descriptors.pkl
    (manifest None)."""
    directory = os.fspath(directory)
    if all(store.has_store(directory, split) for split in splits):
        out = {}
        for split in splits:
            s = store.read_store(directory, split)
            out[split] = (s.descriptors, s.valid, store.array_path(directory, split), s.manifest)
        store.check_same_extraction(
            {store.manifest_path(directory, split): out[split][3] for split in splits}
        )
        return out
    path = os.path.join(directory, PICKLE_NAME)
    if not os.path.exists(path):
        missing = [s for s in splits if not store.has_store(directory, s)]
        raise FileNotFoundError(
            f"{directory}: no descriptors: neither tfmet stores (missing "
            f"{', '.join(os.path.basename(store.manifest_path(directory, s)) for s in missing)}) "
            f"nor {PICKLE_NAME}"
        )
    arrays = load_reference_descriptors(path)
    out = {}
    for split in splits:
        if PICKLE_KEYS[split] not in arrays:
            raise ValueError(f"{path}: no '{PICKLE_KEYS[split]}' entry")
        x = arrays[PICKLE_KEYS[split]]
        out[split] = (x, np.ones(x.shape[0], bool), f"{path}[{PICKLE_KEYS[split]}]", None)
    return out


def load_met_descriptors(directory, info_dir, mini=False, splits=SPLITS):
    """Descriptors and Met labels of `splits` as {split: SplitData}, checked for consistency.

    Raises:
      FileNotFoundError / ValueError naming the file and the problem: missing files, descriptor
      and ground-truth counts that differ, rows whose recorded image or label is not the ground
      truth's, splits extracted with different models or settings, dimensions that differ
      between splits, NaN or infinite values in a row marked valid.
    """
    arrays = _read_descriptors(directory, splits)
    data = {}
    for split in splits:
        descriptors, valid, source, manifest = arrays[split]
        ground_truth = met.load_split(info_dir, split, mini=mini)
        if len(ground_truth) != descriptors.shape[0]:
            raise ValueError(
                f"{source}: {descriptors.shape[0]} descriptors but {ground_truth.source} lists "
                f"{len(ground_truth)} images"
            )
        if manifest is not None:
            store.check_ground_truth(
                store.manifest_path(directory, split),
                manifest,
                ground_truth.paths,
                ground_truth.labels,
                ground_truth.source,
            )
        data[split] = SplitData(descriptors, ground_truth.labels, np.asarray(valid, bool), source)
    dims = {split: d.descriptors.shape[1] for split, d in data.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"{directory}: descriptor dimensions differ between splits: {dims}")
    for d in data.values():
        check_finite(d.source, d.descriptors if d.all_valid else d.valid_descriptors())
    return data


@dataclasses.dataclass
class KnnEvalResult:
    """What `knn_eval` found; `to_json()` is the results file's content."""

    k: int
    tau: float
    dim: int | None
    backend: str
    val: dict
    test: dict | None
    timings_s: dict
    tuning: tuning.TuningResult | None
    predictions: dict
    counts: dict
    threshold: dict | None = None
    search: dict | None = None  # `recall.SearchChoice.to_json()` of an approximate backend
    rerank: dict | None = None  # `rerank.RerankResult.to_json()` + its operating threshold

    def to_json(self):
        return {
            "k": self.k,
            "t": self.tau,
            "dim": self.dim,
            "backend": self.backend,
            "val": self.val,
            "test": self.test,
            "timings_s": {name: round(t, 4) for name, t in self.timings_s.items()},
            "grid": None
            if self.tuning is None
            else {
                "ks": list(self.tuning.ks),
                "taus": list(self.tuning.taus),
                "val_gap": self.tuning.grid.tolist(),
            },
            "counts": self.counts,
            **({} if self.threshold is None else {"threshold": self.threshold}),
            "search": self.search,
            **({} if self.rerank is None else {"rerank": self.rerank}),
        }


class _Timer:
    def __init__(self):
        self.timings = {}

    def __call__(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = (
                    timer.timings.get(name, 0.0) + time.perf_counter() - self.start
                )

        return _Phase()


def _predict_split(classifier, split, k=None, neighbors=None):
    """(pred, conf) for every row of a query split; invalid rows get -1 / 0."""
    pred = np.full(split.labels.shape, -1, np.int64)
    conf = np.zeros(split.labels.shape, np.float64)
    if neighbors is None:
        neighbors = classifier.neighbors(split.valid_descriptors(), k)
    pred[split.valid], conf[split.valid] = classifier.predict_from_neighbors(*neighbors)
    return pred, conf


def knn_eval(
    data,
    dim=512,
    raw=False,
    k=None,
    tau=None,
    autotune=False,
    val_eval=False,
    ks=tuning.DEFAULT_KS,
    taus=tuning.DEFAULT_TAUS,
    search=EXACT,
    log=None,
    target_precision=None,
    rerank=None,
):
    """Runs the Met kNN evaluation on loaded `data` ({split: SplitData}).

    Args:
      dim: PCA-whitening dimension (ignored with `raw`); a database of fewer descriptors than
        that is whitened to the rank of its covariance instead (logged; the result's `dim`).
      raw: skip PCA-whitening.
      k, tau: the classifier's parameters; with `autotune` they restrict the grid to that k / tau.
      autotune: choose (k, tau) by val GAP over the grid (`ks` x `taus`, K outer, tau inner).
      val_eval: report the final classifier on val only (no test search).
      search: a `tfmet.retrieval.knn.KnnSearch`; an approximate backend ("scann") measures its
        recall against exact search on the val queries at the largest k used.
      log: callable taking a line of text.
      target_precision: choose the operating threshold as the lowest val threshold reaching this
        precision instead of the one of maximal val F1 (`tfmet.metrics.operating_point`).
      rerank: None, or a `tfmet.retrieval.rerank.SpatialRerank`: also report the decision
        re-ranked by spatial verification of its `top` global neighbours, with its `local`
        features of every split (`load_local_features`).

    Returns:
      a `KnnEvalResult`.
    """
    log = log or (lambda line: None)
    timer = _Timer()
    train, val = data["train"], data["val"]
    _check_inputs(train, val, dim, raw, k, tau, autotune)
    if not isinstance(search, KnnSearch):
        raise ValueError(f"`search` must be a KnnSearch. Received: {search!r}")
    _check_rerank(rerank, data)
    database = train.valid_descriptors()
    database_labels = train.labels[train.valid]
    counts = _counts(data, database, database_labels, log)
    splits = {"val": val} if val_eval or "test" not in data else {"val": val, "test": data["test"]}
    with contextlib.ExitStack() as stack:
        if not raw:
            # For an approximate backend the whitened database goes to a temporary file that
            # ScaNN's build and the calibration's exact searches read chunk by chunk.
            spill_dir = None
            if search.approximate:
                spill_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfmet_knn_"))
            database, splits, dim = _whiten(database, splits, dim, timer, log, spill_dir)
        if autotune:
            ks = _grid_ks((k,) if k is not None else ks, counts, log)
            taus = (tau,) if tau is not None else taus
        recall_k = max(ks) if autotune else k
        classifier = search.classifier(1 if k is None else k, 1.0 if tau is None else tau)
        _fit_classifier(classifier, database, database_labels, splits, recall_k, timer, log)
        del database
        choice = _search_choice(classifier, log)
        result_tuning, predictions = _predict_splits(
            classifier, splits, autotune, ks, taus, timer, log
        )
        metrics = _evaluate(predictions, log)
        threshold = _operating_threshold(predictions, target_precision, log)
        reranked = None
        if rerank is not None:
            with timer("rerank"):
                reranked = _rerank(
                    classifier, splits, predictions, train, rerank, target_precision, log
                )
        return KnnEvalResult(
            k=classifier.k,
            tau=classifier.tau,
            dim=None if raw else int(dim),
            backend=search.backend,
            val=metrics["val"],
            test=metrics.get("test"),
            timings_s=timer.timings,
            tuning=result_tuning,
            predictions=predictions,
            counts=counts,
            threshold=threshold,
            search=choice,
            rerank=reranked,
        )


def _fit_classifier(classifier, database, labels, splits, recall_k, timer, log):
    """Fits `classifier` to the (whitened) database; an approximate backend measures its recall
    at `recall_k` on the val queries and weighs its calibration and build against the exact
    search time it would save on all the queries of `splits`."""
    with timer("index_build"):
        recall_queries = None
        if classifier.index.approximate:
            recall_queries = splits["val"].valid_descriptors()
        total = sum(int(np.sum(s.valid)) for s in splits.values())
        classifier.fit(database, labels, recall_queries, recall_k, log=log, total_queries=total)


def _predict_splits(classifier, splits, autotune, ks, taus, timer, log):
    """(TuningResult or None, {split: (pred, conf, labels)}): val (tuned on first with
    `autotune`), then test with the final (k, tau)."""
    result_tuning = None
    if autotune:
        result_tuning, val_pred = _autotune(classifier, splits["val"], ks, taus, timer, log)
    else:
        with timer("val_search"):
            val_pred = _predict_split(classifier, splits["val"])
    predictions = {"val": (*val_pred, splits["val"].labels)}
    if "test" in splits:
        with timer("test_search"):
            test_pred = _predict_split(classifier, splits["test"])
        predictions["test"] = (*test_pred, splits["test"].labels)
    return result_tuning, predictions


def _evaluate(predictions, log):
    """{split: GAP / GAP- / ACC} of each split's predictions, logged."""
    metrics = {name: recognition.evaluate(*p) for name, p in predictions.items()}
    for name, values in metrics.items():
        log(
            f"{name}: GAP {values['gap']:.6f}, GAP- {values['gap_minus']:.6f}, "
            f"ACC {values['acc']:.6f}"
        )
    return metrics


def load_local_features(directory, splits=SPLITS):
    """{split: LocalStore} of a store directory extracted with `--local_features`."""
    return {split: store.read_local(directory, split) for split in splits}


def _check_rerank(rerank, data):
    if rerank is None:
        return
    if not isinstance(rerank, rerank_lib.SpatialRerank):
        raise ValueError(f"`rerank` must be None or a SpatialRerank. Received: {rerank!r}")
    local = rerank.local
    missing = [split for split in data if split not in local]
    if missing:
        raise ValueError(f"--rerank=spatial needs the local features of {', '.join(missing)}")
    for split, split_data in data.items():
        if len(local[split].counts) != len(split_data.labels):
            raise ValueError(
                f"{split_data.source}: {len(split_data.labels)} rows but the local features "
                f"hold {len(local[split].counts)}"
            )


def _rerank(classifier, splits, predictions, train, rerank, target_precision, log):
    """The "rerank" block of the results: the re-ranked metrics and their own threshold."""
    local = rerank.local
    database = (train.labels[train.valid], local["train"], np.flatnonzero(train.valid))
    result = rerank_lib.spatial_rerank(
        classifier, splits, local, predictions, database, rerank.top, log,
        spatial.DEFAULT_THRESHOLD,
    )  # fmt: skip
    threshold = _operating_threshold(result.predictions, target_precision, log)
    return result.to_json() | {"threshold": threshold}


def _operating_threshold(predictions, target_precision, log):
    """The results' "threshold" block: chosen on val with the final (k, tau), reported on test."""
    rule = "max_f1" if target_precision is None else "target_precision"
    value, val_metrics = operating_point.choose_threshold(
        *predictions["val"], rule=rule, target_precision=target_precision
    )
    test_metrics = None
    if "test" in predictions:
        test_metrics = operating_point.evaluate_threshold(*predictions["test"], value)
    for name, values in (("val", val_metrics), ("test", test_metrics)):
        if values is not None:
            log(
                f"threshold {value:.6f} ({rule}) on {name}: precision {values['precision']:.4f}, "
                f"recall {values['recall']:.4f}, F1 {values['f1']:.4f}, "
                f"false-accept rate {values['false_accept_rate']:.4f}"
            )
    return operating_point.threshold_block(rule, value, val_metrics, test_metrics)


def _check_inputs(train, val, dim, raw, k, tau, autotune):
    # The messages name the tfmet-knn-eval flags of the same names (`t` is tau).
    if val.labels.size == 0 or not np.any(val.valid):
        raise ValueError(f"{val.source}: the validation set is empty (no valid query)")
    if not np.any(train.valid):
        raise ValueError(f"{train.source}: the database has no valid descriptor")
    if not autotune and (k is None or tau is None):
        raise ValueError("--k and --t are required unless --autotune is given")
    descriptor_dim = train.descriptors.shape[1]
    if not raw and not 1 <= dim <= descriptor_dim:
        raise ValueError(
            f"--dim {dim} is larger than the descriptor dimension {descriptor_dim} "
            f"of {train.source}"
        )


def _counts(data, database, database_labels, log):
    counts = {
        "database": int(database.shape[0]),
        "classes": int(np.unique(database_labels).size),
        "invalid": {name: int(np.sum(~d.valid)) for name, d in data.items()},
        "queries": {name: int(d.labels.size) for name, d in data.items() if name != "train"},
    }
    log(
        f"database: {counts['database']} images of {counts['classes']} classes; invalid rows "
        f"(left out of the database, counted wrong as queries): {counts['invalid']}"
    )
    return counts


def _whiten(database, splits, dim, timer, log, spill_dir=None):
    """PCA-whitening learned on the database, applied to it and to the query splits; with
    `spill_dir` the whitened database is written there and returned memory-mapped. Returns
    (database, splits, dimension): `dim`, or the rank of the database's covariance when that is
    smaller (n descriptors whiten to at most n - 1 dimensions; said in the log)."""
    with timer("pcaw_fit"):
        whitening = PCAWhitening(dim, clip_to_rank=True).fit(database)
    with timer("pcaw_apply"):
        if spill_dir is None:
            database = whitening.transform(database)
        else:
            path = os.path.join(spill_dir, "whitened_database.npy")
            database = whitening.transform_to_file(database, path)
        splits = {
            name: dataclasses.replace(s, descriptors=whitening.transform(s.descriptors))
            for name, s in splits.items()
        }
    if whitening.dim < dim:
        log(
            f"PCA-whitening to {whitening.dim} dimensions, not --dim {dim}: the covariance of the "
            f"{database.shape[0]} database descriptors has only {whitening.dim} non-zero "
            "eigenvalues"
        )
    else:
        log(f"PCA-whitening to {dim} dimensions learned on the database")
    return database, splits, whitening.dim


def _grid_ks(ks, counts, log):
    """The grid's k values that the database can serve (the others are skipped, and said so)."""
    skipped = [x for x in ks if x > counts["database"]]
    if skipped:
        log(f"grid: skipping k {skipped} larger than the database ({counts['database']})")
    return tuple(x for x in ks if x <= counts["database"])


def _search_choice(classifier, log):
    """The measured-recall search choice of an approximate classifier, logged (None for exact)."""
    if classifier.search_choice is None:
        return None
    search = classifier.search_choice.to_json()
    log(
        f"search: {search['backend']}, recall@{search['k']} {search['recall']:.4f}; "
        f"{search['reason']}"
    )
    return search


def _autotune(classifier, val, ks, taus, timer, log):
    """(k, tau) by val GAP over the grid with one val search; sets them on `classifier`.

    Returns (TuningResult, val predictions).
    """
    with timer("val_search"):
        val_neighbors = classifier.neighbors(val.valid_descriptors(), max(ks))
    with timer("tuning"):
        # Invalid queries are wrong at every grid point: tune on all labels with -1/0 for them.
        grid_classifier = _GridAdapter(classifier, val.valid)
        result = tuning.tune_on_neighbors(grid_classifier, *val_neighbors, val.labels, ks, taus)
    classifier.k, classifier.tau = result.k, result.tau
    log(f"tuned on val: k={result.k} t={result.tau} GAP={result.gap:.6f}")
    with timer("val_eval"):
        val_pred = _predict_split(classifier, val, neighbors=val_neighbors)
    return result, val_pred


class _GridAdapter:
    """Puts a classifier's predictions for the valid queries back among all queries."""

    def __init__(self, classifier, valid):
        self.classifier = classifier
        self.valid = valid

    def predict_from_neighbors(self, similarities, indices, k, tau):
        pred = np.full(self.valid.shape, -1, np.int64)
        conf = np.zeros(self.valid.shape, np.float64)
        pred[self.valid], conf[self.valid] = self.classifier.predict_from_neighbors(
            similarities, indices, k, tau
        )
        return pred, conf
