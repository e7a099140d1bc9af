"""The modules `tfmet-export` writes, assembled from files, for Python users and the program.

    extractor, spec = tfmet.descriptors.build_extractor(
        backbone="resnet18", weights="r18.weights.h5")
    module, metadata = tfmet.export.build_recognizer(
        extractor, spec, descriptor_dir="desc/", info_dir="met/", k=10, tau=25.0)
    tfmet.export.save_module(module, "exports/met", module.signatures(), metadata)

Each builder returns (module, metadata): the metadata describe the export (model spec, k, tau,
PCA-whitening, database size, ...) and go into `assets/tfmet_metadata.json`.
"""

import math
import os

import numpy as np
from absl import logging

from tfmet.io.json_files import read_json


def classifier_settings(results_json=None, k=None, tau=None, dim=None, default_dim=512):
    """(k, tau, dim) of the recogniser: given values first, else those of a knn-eval results file.

    Args:
      results_json: a `tfmet-knn-eval` results file with the tuned "k", "t" and "dim", or None.
      k, tau: explicit values (override the file's).
      dim: explicit PCA-whitening dimension (overrides the file's); None takes the file's "dim"
        (None there means raw descriptors), else `default_dim`.

    Raises:
      ValueError: the file is not a results file, or `k`/`tau` are missing from both.
    """
    file_dim = default_dim
    if results_json:
        results = read_json(results_json, "tfmet-knn-eval results file")
        if not isinstance(results, dict) or "k" not in results or "t" not in results:
            raise ValueError(f"{results_json}: not a tfmet-knn-eval results file")
        k = results["k"] if k is None else k
        tau = results["t"] if tau is None else tau
        file_dim = results.get("dim", default_dim)
    if k is None or tau is None:
        raise ValueError("the recogniser needs `k` and `tau`, or `results_json` to read them from")
    if int(k) < 1:
        raise ValueError(f"`k` must be >= 1. Received: k={k}")
    if not math.isfinite(float(tau)) or float(tau) < 0:
        # A negative tau would rank the confidences backwards (as tfmet-knn-eval refuses it).
        raise ValueError(f"`tau` must be a finite number >= 0. Received: tau={tau}")
    return int(k), float(tau), file_dim if dim is None else dim


def threshold_settings(results_json=None, threshold=None, given_as="threshold argument"):
    """(threshold, rule, source) of the recogniser's "accepted": a given `threshold` ("manual"),
    else the one tfmet-knn-eval chose (its results file's "threshold" block), else 0.0 ("none":
    every decodable photo is accepted)."""
    if threshold is not None:
        return float(threshold), "manual", given_as
    if results_json:
        results = read_json(results_json, "tfmet-knn-eval results file")
        block = results.get("threshold") if isinstance(results, dict) else None
        if isinstance(block, dict) and "value" in block:
            return float(block["value"]), str(block.get("rule", "")), os.fspath(results_json)
    return 0.0, "none", ""


def scann_config(results_json=None):
    """The ScaNN configuration tfmet-knn-eval chose by measured recall (its results file's
    "search" block), or None (then the recogniser sizes one itself)."""
    if not results_json:
        return None
    results = read_json(results_json, "tfmet-knn-eval results file")
    search = (results.get("search") if isinstance(results, dict) else None) or {}
    return search.get("config")


RERANK_KEYS = ("top", "residual_threshold", "weight", "saturation")


def rerank_settings(results_json):
    """The spatial re-ranking tfmet-knn-eval --rerank=spatial tuned (its results file's "rerank"
    block): {"top", "residual_threshold", "weight", "saturation", "threshold", "threshold_rule"}.

    Raises:
      ValueError: no file, or a file without a complete "rerank" block (named in the message).
    """
    if not results_json:
        raise ValueError(
            "--rerank=spatial needs --results_json of a tfmet-knn-eval --rerank=spatial run"
        )
    results = read_json(results_json, "tfmet-knn-eval results file")
    block = results.get("rerank") if isinstance(results, dict) else None
    if not isinstance(block, dict) or block.get("method") != "spatial":
        raise ValueError(
            f'{results_json}: no spatial "rerank" block (run tfmet-knn-eval --rerank=spatial)'
        )
    missing = [key for key in RERANK_KEYS if key not in block]
    if missing:
        raise ValueError(f'{results_json}: the "rerank" block lacks {", ".join(missing)}')
    threshold = block.get("threshold") or {}
    return {
        "top": int(block["top"]),
        "residual_threshold": float(block["residual_threshold"]),
        "weight": float(block["weight"]),
        "saturation": float(block["saturation"]),
        "threshold": float(threshold.get("value", 0.0)),
        "threshold_rule": str(threshold.get("rule", "none")),
    }


def read_database_local(descriptor_dir, valid):
    """(LocalSpec, {asset file name: array}) of the train store's local features, `valid` rows.

    Raises:
      ValueError: the store has no local features (the message names its manifest).
    """
    from tfmet.data.descriptor_store import read_local
    from tfmet.descriptors.local import LocalSpec

    store = read_local(descriptor_dir, "train")
    spec = LocalSpec(int(store.spec["num"]), int(store.spec["dim"]), int(store.spec["seed"]))
    arrays = {
        f"rerank_local_{name}.npy": np.ascontiguousarray(getattr(store, name)[valid])
        for name in ("points", "descriptors", "scores", "counts")
    }
    return spec, arrays


def whitening(pca=None, train=None, dim=None, raw=False):
    """(mean, projection) of the PCA-whitening to bake in, or None for none.

    Args:
      pca: a saved `PCAWhitening` (.npz) to use as it is.
      train: otherwise, descriptors to fit one on (with `dim`), as tfmet-knn-eval does.
      dim: the whitened dimension when fitting.
      raw: no whitening at all.
    """
    from tfmet.retrieval import PCAWhitening

    if raw or (pca is None and (train is None or dim is None)):
        return None
    if pca is not None:
        fitted = PCAWhitening.load(pca)
    else:
        logging.info("fitting PCA-whitening (dim %d) on %d train descriptors", dim, len(train))
        fitted = PCAWhitening(dim=dim).fit(train)
    return fitted.mean, fitted.projection


# The recogniser module's attributes its metadata records under the same names.
RECOGNIZER_METADATA = ("k", "tau", "dim", "database_size", "num_classes", "searcher", "threshold")


def _limits(module):
    """The input limits a module's serving signature applies, for its metadata."""
    return dict(max_pixels=module.max_pixels, max_bytes=module.max_bytes)


def _pipeline(spec, pca):
    """What the descriptor and recogniser modules compute, as their keywords: the extraction of
    `spec` (`ExtractionSpec`: scales, resize, max side) and the PCA-whitening `pca` ((mean,
    projection); None for none)."""
    return dict(
        scales=spec.scales, resize_method=spec.resize_method, max_side=spec.max_side, pca=pca
    )


def build_descriptor(extractor, spec, pca=None, **limits):
    """The descriptor export of `extractor` (its `ExtractionSpec` `spec`), optionally whitened;
    `limits`: `max_pixels`, `max_bytes` of `DescriptorModule` (its defaults if not given)."""
    from tfmet.export.descriptor import DescriptorModule

    module = DescriptorModule(extractor.embedder, **_pipeline(spec, whitening(pca=pca)), **limits)
    metadata = dict(
        spec.metadata(), dim=module.dim, pca_whitening=module.whitened, **_limits(module)
    )
    return module, metadata


def read_database(descriptor_dir, info_dir, spec, mini=False, with_valid=False):
    """(descriptors, Met ids) of the valid rows of the train store, checked against the model
    (and the store's valid mask when `with_valid`).

    Raises:
      ValueError: the store's rows do not match the ground truth, or it was extracted with other
        weights than `spec` describes.
    """
    from tfmet.data.descriptor_store import check_ground_truth, manifest_path, read_store
    from tfmet.data.met import load_split

    store = read_store(descriptor_dir, "train")
    ground_truth = load_split(info_dir, "train", mini=mini)
    labels = ground_truth.labels
    check_ground_truth(
        manifest_path(descriptor_dir, "train"),
        store.manifest,
        ground_truth.paths,
        labels,
        ground_truth.source,
    )
    if store.manifest.get("weights_sha256") not in (None, spec.weights):
        raise ValueError(
            f"{descriptor_dir}: descriptors were made with weights "
            f"{store.manifest['weights_sha256']}, the model to export has {spec.weights}"
        )
    found = np.asarray(store.descriptors[store.valid]), labels[store.valid]
    return (*found, store.valid) if with_valid else found


def build_recognizer(
    extractor,
    spec,
    descriptor_dir,
    info_dir,
    k,
    tau,
    pca=None,
    dim=512,
    raw=False,
    mini=False,
    searcher="exact",
    top_k=5,
    threshold=(0.0, "none", ""),
    scann_config=None,
    rerank=None,
    **limits,
):
    """The one-piece recogniser: `extractor` + the train store of `descriptor_dir` as database.

    Args:
      extractor, spec: from `tfmet.descriptors.build_extractor` (the model that made the store).
      descriptor_dir: `tfmet-extract` output holding the train store.
      info_dir: Met ground truth (the database's Met ids).
      k, tau: the kNN classifier's parameters (see `classifier_settings`).
      pca, dim, raw: PCA-whitening (see `whitening`): a saved one, or fitted to `dim` on the
        database as tfmet-knn-eval does, or none.
      mini: the database is mini_MET_database.json.
      searcher: a searcher name of `tfmet.retrieval.searchers.SEARCHERS` ("exact", "scann").
      top_k: candidates returned per image.
      threshold: (value, rule, source) of the operating threshold (see `threshold_settings`):
        `accepted` is `confidence >= value`.
      scann_config: with an approximate searcher ("scann"), the configuration to build (a
        dict, see `scann_config`); None sizes one for the database.
      rerank: None, or the spatial re-ranking to serve (`rerank_settings`): the train store's
        local features go into the export as .npy assets (`module.asset_arrays`), the module
        gets the `local_features` signature, and the metadata's "rerank" entry says how the
        client verifies and which threshold then decides.
      limits: `max_pixels`, `max_bytes` of `DescriptorModule` (its defaults if not given).
    """
    from tfmet.export.recognizer import RecognizerModule
    from tfmet.retrieval import apply_pca_whitening, searcher_class

    if searcher_class(searcher).approximate and scann_config is None:
        from absl import logging

        logging.warning(
            f"searcher {searcher!r} without a measured configuration (the results file of a "
            f"tfmet-knn-eval --backend {searcher} run): the exported searcher's recall against "
            "exact search is not measured and can be far below 0.99 (docs/recognition.md)"
        )
    train, labels, valid = read_database(descriptor_dir, info_dir, spec, mini=mini, with_valid=True)
    local, arrays = (None, {}) if rerank is None else read_database_local(descriptor_dir, valid)
    pca = whitening(pca=pca, train=train, dim=dim, raw=raw)
    database = train if pca is None else apply_pca_whitening(train, *pca)
    module = RecognizerModule(
        extractor.embedder,
        database,
        labels,
        k=k,
        tau=tau,
        searcher=searcher,
        top_k=top_k,
        threshold=threshold[0],
        scann_config=scann_config,
        local=local,
        rerank_top=rerank["top"] if rerank else 20,
        **_pipeline(spec, pca),
        **limits,
    )
    metadata = dict(
        spec.metadata(),
        **_limits(module),
        **{name: getattr(module, name) for name in RECOGNIZER_METADATA},
        pca_whitening=module.whitened,
        threshold_rule=threshold[1],
        threshold_source=threshold[2],
        scann_config=None if module.scann_config is None else module.scann_config.to_dict(),
    )
    if rerank is not None:
        arrays["rerank_labels.npy"] = np.asarray(labels, np.int64)
        module.asset_arrays = arrays
        metadata["rerank"] = dict(
            rerank,
            method="spatial",
            top=module.rerank_top,
            local_features=dict(local.metadata(), local_dim=module.local_dim),
            threshold=float(np.float32(rerank["threshold"])),
        )
    return module, metadata


def build_style(style_model, image_size=None, top_k=5, trust_model=False, **limits):
    """The style classifier export of a `tfmet-train-style` run directory or `.keras` file;
    `limits`: `max_pixels`, `max_bytes` of `StyleModule`."""
    from tfmet.export.style_classifier import StyleModule
    from tfmet.training.style import trained_run

    classifier = trained_run.load_classifier(style_model, trust_model=trust_model)
    if image_size is None:
        run_dir = trained_run.run_dir_of(style_model)
        image_size = trained_run.read_run_config(run_dir)["model"]["image_size"]
    module = StyleModule(classifier, image_size, top_k=top_k, **limits)
    metadata = dict(
        backbone=classifier.backbone_name or classifier.backbone.name,
        image_size=module.image_size,
        class_names=module.class_names,
        **_limits(module),
    )
    return module, metadata
