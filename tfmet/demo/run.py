"""The demo run: benchmark -> descriptors -> tuned kNN classifier -> GAP / GAP- / ACC -> report.

The steps are the library calls behind the programs, in the order a user runs them:

    tfmet-extract    --info_dir I --image_root R --output_dir D --backbone B --weights W
    (kNN evaluation) tune k, tau on val by GAP; classify test; GAP, GAP-, ACC

`run_demo` prints these commands, so the same numbers can be reproduced by hand.
"""

import dataclasses
import os
import time

import numpy as np

from tfmet.demo import report

RANDOM = "random"
IMAGENET = "imagenet"


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
      run_name: "<backbone>-<weights tag>", the name of its folders.
      k, tau: the kNN settings chosen on val.
      val, test: {"gap", "gap_minus", "acc"} (fractions).
      png: the matches picture; tensorboard: the log folder; descriptors: the stores' folder.
      num_database, num_val, num_test: split sizes.
      seconds: wall time of the whole run.
    """

    run_name: str
    k: int
    tau: float
    val: dict
    test: dict
    png: str
    tensorboard: str
    descriptors: str
    num_database: int
    num_val: int
    num_test: int
    seconds: float


def _check_weights(backbone, weights):
    """Fails fast (before any work) on a `--weights` value `resolve_weights` would refuse."""
    if weights == IMAGENET and backbone != "efficientnet_lite0":
        raise ValueError(
            f"no packaged ImageNet weights for backbone {backbone!r}: convert a PyTorch "
            "checkpoint with tfmet-convert-weights and pass --weights FILE.weights.h5, or use "
            "--weights random (only efficientnet_lite0 ships with weights)"
        )
    if weights not in (IMAGENET, RANDOM) and not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: weights file not found")


def resolve_weights(backbone, weights):
    """(local weights file or None for random, tag for folder names) of a `--weights` value.

    `weights` is "imagenet" (the packaged weights; EfficientNet-Lite0 only), "random" (seeded
    random initialisation), or a `.weights.h5` file (e.g. from tfmet-convert-weights).
    """
    if weights == RANDOM:
        return None, RANDOM
    _check_weights(backbone, weights)
    if weights == IMAGENET:
        from tfmet.backbones import efficientnet_lite

        return efficientnet_lite.pretrained_weights(), IMAGENET
    stem = os.path.basename(weights)
    return weights, stem[: -len(".weights.h5")] if stem.endswith(".weights.h5") else stem


def _extractor(backbone, weights, seed, multiscale, max_side):
    """`DescriptorExtractor` + `ExtractionSpec`; converted embedder files keep p and projector."""
    from tfmet.backbones import torch_convert
    from tfmet.descriptors import extraction

    scales = None if multiscale else (1.0,)
    metadata = torch_convert.read_metadata(weights) if weights else {}
    if metadata.get("kind") != "embedder":
        return extraction.build_extractor(
            backbone=backbone, weights=weights, seed=seed, scales=scales, max_side=max_side
        )
    from tfmet.descriptors.embedder import MET_SCALES, DescriptorExtractor

    embedder = torch_convert.load_embedder(weights, arch=backbone)
    scales = MET_SCALES if scales is None else scales
    spec = extraction.ExtractionSpec(
        backbone=backbone,
        weights=extraction.weights_fingerprint(weights),
        scales=scales,
        resize_method="torch",
        max_side=max_side,
        dim=embedder.output_dim,
    )
    return DescriptorExtractor(embedder, scales=scales), spec


def _descriptors(store):
    """float32 rows of a store with invalid rows zeroed, and the validity mask."""
    rows = np.asarray(store.descriptors, np.float32)
    return np.where(store.valid[:, None], rows, 0.0).astype(np.float32), store.valid


def _postprocess(train, queries, pca_dim):
    """Raw descriptors, or PCA-whitened (learned on the database) when `pca_dim` > 0."""
    if not pca_dim:
        return train, queries
    from tfmet.retrieval.pca import PCAWhitening

    whitening = PCAWhitening(dim=pca_dim).fit(train)
    return whitening.transform(train), [whitening.transform(q) for q in queries]


def default_pca_dim(num_database, dim):
    """PCA-whitening to 512 as the Met reference when the database can estimate it (>= 4 x 512
    images, and 512 < descriptor size); raw descriptors otherwise (the demo's 20 images)."""
    return 512 if num_database >= 4 * 512 and dim > 512 else 0


def run_demo(
    workdir,
    backbone="efficientnet_lite0",
    weights=IMAGENET,
    info_dir=None,
    image_root=None,
    seed=0,
    multiscale=True,
    max_side=None,
    pca_dim=None,
    examples=8,
    benchmark_config=None,
    progress=True,
    log=print,
):
    """Runs the demo end to end and reports; see the module docstring.

    Args:
      workdir: where everything is written (benchmark/, descriptors/<run>/, tensorboard/<run>/,
        matches-<run>.png).
      backbone: registered backbone name.
      weights: "imagenet", "random" or a `.weights.h5` file (see `resolve_weights`).
      info_dir, image_root: a Met-format folder to use instead of the demo benchmark.
      seed: seed of a random initialisation and of the benchmark.
      multiscale: the Met reference's three scales (else scale 1 only).
      max_side: cap images' long side before extraction (None: native size, as the reference).
      pca_dim: 0 for raw descriptors, n for PCA-whitening to n; None chooses
        (`default_pca_dim`).
      examples: rows of the matches picture.
      benchmark_config: a `tfmet.demo.benchmark.BenchmarkConfig` for the built benchmark.
      progress: show progress bars.
      log: where messages go (print by default).

    Returns:
      a `DemoResult`.
    """
    started = time.perf_counter()
    workdir = os.path.abspath(os.fspath(workdir))
    if (info_dir is None) != (image_root is None):
        raise ValueError("give both --info_dir and --image_root (a Met-format folder), or neither")
    _check_weights(backbone, weights)  # before the (slow) TensorFlow imports

    from tfmet.data import met
    from tfmet.descriptors import extraction
    from tfmet.descriptors import store as store_lib
    from tfmet.metrics import met as met_metrics
    from tfmet.retrieval.knn import KnnClassifier
    from tfmet.retrieval.tuning import DEFAULT_KS, DEFAULT_TAUS, tune_on_neighbors

    names, captions = {}, {}
    if info_dir is None:
        from tfmet.demo import benchmark as benchmark_lib

        config = benchmark_config or benchmark_lib.BenchmarkConfig(seed=seed)
        root = os.path.join(workdir, "benchmark")
        built = benchmark_lib.is_built(root, config)
        log(f"[1/4] {'Using' if built else 'Building'} the demo benchmark of real photos in {root}")
        bench = benchmark_lib.build_benchmark(root, config, progress=progress)
        info_dir, image_root, names = bench.info_dir, bench.image_root, bench.exhibits
        captions = {q["path"]: q["source"] for q in bench.provenance["queries"]}
    else:
        log(f"[1/4] Using the Met-format folder {info_dir} (images under {image_root}/images)")
    splits = extraction.load_met_splits(info_dir, ("train", "val", "test"))
    train_split, val_split, test_split = splits
    log(
        f"      database {len(train_split)} images of {len(np.unique(train_split.labels))} "
        f"exhibits; val {len(val_split)} queries, test {len(test_split)} queries "
        f"({int(test_split.is_distractor.sum())} distractors)"
    )

    weights_file, tag = resolve_weights(backbone, weights)
    run_name = f"{backbone}-{tag}" + (f"-seed{seed}" if weights_file is None else "")
    output_dir = os.path.join(workdir, "descriptors", run_name)
    log(f"[2/4] Extracting descriptors with {backbone} ({tag} weights) into {output_dir}")
    log(
        f"      = tfmet-extract --info_dir {info_dir} --image_root {image_root} "
        f"--output_dir {output_dir} --backbone {backbone}"
        + (f" --weights {weights_file}" if weights_file else f" --seed {seed}")
        + ("" if multiscale else " --nomultiscale")
        + (f" --max_side {max_side}" if max_side else "")
    )
    extractor, spec = _extractor(backbone, weights_file, seed, multiscale, max_side)
    reports = extraction.extract_met(
        extractor, spec, splits, image_root, output_dir, progress=progress
    )
    for r in reports:
        if r.images:
            log(f"      {r.split}: {r.images} images, {r.images_per_second:.1f} images/s")

    stores = {s: store_lib.read_store(output_dir, s, mmap=False) for s in ("train", "val", "test")}
    train, train_valid = _descriptors(stores["train"])
    if not train_valid.any():
        raise ValueError(f"{output_dir}: no database image could be read")
    train, labels = train[train_valid], train_split.labels[train_valid]
    database_paths = [p for p, ok in zip(met.image_paths(train_split, image_root), train_valid,
                                         strict=True) if ok]  # fmt: skip
    val, val_valid = _descriptors(stores["val"])
    test, test_valid = _descriptors(stores["test"])
    pca_dim = default_pca_dim(len(train), train.shape[1]) if pca_dim is None else int(pca_dim)
    train, (val, test) = _postprocess(train, [val, test], pca_dim)

    log(
        "[3/4] kNN classifier: tuning k and tau on val by GAP ("
        + ("raw descriptors" if not pca_dim else f"PCA-whitened to {pca_dim}")
        + ")"
    )
    ks = tuple(k for k in DEFAULT_KS if k <= len(train))
    classifier = KnnClassifier().fit(train, labels)
    similarities, indices = classifier.neighbors(val, max(ks))
    tuning = tune_on_neighbors(
        classifier, similarities, indices, val_split.labels, ks, DEFAULT_TAUS
    )
    classifier.k, classifier.tau = tuning.k, tuning.tau

    def evaluate(queries, valid, truth):
        similarities, indices = classifier.neighbors(queries, min(len(train), max(tuning.k, 4)))
        pred, conf = classifier.predict_from_neighbors(similarities, indices)
        pred, conf = np.where(valid, pred, -1), np.where(valid, conf, 0.0)
        return met_metrics.evaluate(pred, conf, truth), pred, conf, similarities, indices

    val_metrics = evaluate(val, val_valid, val_split.labels)[0]
    test_metrics, pred, conf, similarities, indices = evaluate(test, test_valid, test_split.labels)
    log(f"      best k={tuning.k}, tau={tuning.tau:g}; val {report.format_metrics(val_metrics)}")

    log("[4/4] Results on the test queries")
    log(f"      {run_name}: {report.format_metrics(test_metrics)}")

    test_paths = met.image_paths(test_split, image_root)
    rows = report.choose_examples(pred, conf, test_split.labels, count=examples, seed=seed)
    queries = [
        {
            "path": test_paths[i],
            "label": int(test_split.labels[i]),
            "pred": int(pred[i]),
            "conf": float(conf[i]),
            "neighbors": indices[i, :4],
            "similarities": similarities[i, :4],
            "caption": captions.get(test_split.paths[i]),
        }
        for i in rows
    ]
    png = report.matches_figure(queries, database_paths, labels, names)
    png_path = report.write_png(os.path.join(workdir, f"matches-{run_name}.png"), png)
    tensorboard = report.write_tensorboard(
        os.path.join(workdir, "tensorboard", run_name),
        {
            "test/GAP": 100 * test_metrics["gap"],
            "test/GAP-": 100 * test_metrics["gap_minus"],
            "test/ACC": 100 * test_metrics["acc"],
            "val/GAP": 100 * val_metrics["gap"],
            "val/GAP-": 100 * val_metrics["gap_minus"],
            "val/ACC": 100 * val_metrics["acc"],
            "knn/k": tuning.k,
            "knn/tau": tuning.tau,
        },
        png=png,
        text=report.EXPLANATION,
        grid=report.grid_figure(tuning),
    )
    log(f"      picture of queries and their top matches: {png_path}")
    log(f"      TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    return DemoResult(
        run_name=run_name,
        k=tuning.k,
        tau=tuning.tau,
        val=val_metrics,
        test=test_metrics,
        png=png_path,
        tensorboard=tensorboard,
        descriptors=output_dir,
        num_database=len(train),
        num_val=len(val_split),
        num_test=len(test_split),
        seconds=time.perf_counter() - started,
    )
