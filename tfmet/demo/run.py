"""The demo run: benchmark -> descriptors -> tuned kNN classifier -> GAP / GAP- / ACC -> figures.

The steps are the library calls behind the programs, in the order a user runs them:

    tfmet-extract --info_dir I --image_root R --output_dir D --backbone B --weights W
    tfmet-knn-eval D --info_dir I --autotune --raw       (tune k, tau on val; GAP on test)

`run_demo` prints these commands, so the same numbers can be reproduced by hand.
"""

import dataclasses
import os
import shlex
import time

import numpy as np

from tfmet.demo import figures
from tfmet.precision import check_precision

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
      serve_command: tfmet-export + tfmet-serve commands that put this run in a web page.
      export_dir: where `serve_command` exports the recogniser.
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
    serve_command: str = ""
    export_dir: str = ""


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
        from tfmet.descriptors import spec as spec_lib

        return spec_lib.packaged_weights(backbone), IMAGENET
    stem = os.path.basename(weights)
    return weights, stem[: -len(".weights.h5")] if stem.endswith(".weights.h5") else stem


def _top_matches(data, rows, pca_dim, count=4):
    """(similarities, database indices) of the `count` nearest database images of test `rows`,
    in the space the classifier searched (raw, or PCA-whitened as `knn_eval` does)."""
    from tfmet.retrieval.knn import KnnClassifier
    from tfmet.retrieval.pca import PCAWhitening

    train = data["train"]
    database = np.asarray(train.valid_descriptors(), np.float32)
    queries = np.asarray(data["test"].descriptors, np.float32)[rows]
    if pca_dim:
        whitening = PCAWhitening(pca_dim).fit(database)
        database, queries = whitening.transform(database), whitening.transform(queries)
    if not len(rows):
        return np.zeros((0, count), np.float32), np.zeros((0, count), np.int64)
    classifier = KnnClassifier().fit(database, train.labels[train.valid])
    return classifier.neighbors(queries, min(count, database.shape[0]))


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
    precision="float32",
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
      precision: what the backbone computes in ("float32", "bfloat16", "float16"); a
        reduced precision gets its own run name ("<backbone>-<weights tag>-<precision>").

    Returns:
      a `DemoResult`.
    """
    started = time.perf_counter()
    workdir = os.path.abspath(os.fspath(workdir))
    if (info_dir is None) != (image_root is None):
        raise ValueError("give both `info_dir` and `image_root` (a Met-format folder), or neither")
    _check_weights(backbone, weights)  # before the (slow) TensorFlow imports
    check_precision(precision)

    bench = _benchmark(workdir, info_dir, image_root, seed, benchmark_config, progress, log)
    model = _DemoModel(backbone, weights, seed, multiscale, max_side, precision)
    output_dir = os.path.join(workdir, "descriptors", model.run_name)
    _extract(bench, model, output_dir, progress, log)
    data, result, pca_dim = _classify(output_dir, bench.info_dir, pca_dim, log)
    results_json = os.path.join(output_dir, "knn_results.json")
    png_path, tensorboard = _report(workdir, bench, model, data, result, pca_dim, examples, log)
    export_dir = os.path.join(workdir, "recognizer", model.run_name)
    return DemoResult(
        run_name=model.run_name,
        k=result.k,
        tau=result.tau,
        val=result.val,
        test=result.test,
        png=png_path,
        tensorboard=tensorboard,
        descriptors=output_dir,
        num_database=result.counts["database"],
        num_val=len(bench.splits[1]),
        num_test=len(bench.splits[2]),
        seconds=time.perf_counter() - started,
        export_dir=export_dir,
        serve_command=serve_command(
            export_dir,
            f"--descriptor_dir {_q(output_dir)} --info_dir {_q(bench.info_dir)} "
            f"--results_json {_q(results_json)}"
            + _model_flags(backbone, model.weights_flag, seed, multiscale, max_side)
            + ("" if precision == "float32" else f" --precision {precision}"),
            f"--info_dir {_q(bench.info_dir)} --image_root {_q(bench.image_root)}"
            + (f" --names {_q(_write_names(workdir, bench.names))}" if bench.names else ""),
        ),
    )


class _DemoModel:
    """The model a demo run extracts with: its settings, resolved weights and run name."""

    def __init__(self, backbone, weights, seed, multiscale, max_side, precision):
        self.backbone, self.seed, self.multiscale = backbone, seed, multiscale
        self.max_side, self.precision = max_side, precision
        self.weights_file, self.tag = resolve_weights(backbone, weights)
        # The printed commands name the packaged weights as every program does: --weights
        # imagenet.
        self.weights_flag = IMAGENET if weights == IMAGENET else self.weights_file
        run_name = f"{backbone}-{self.tag}" + (f"-seed{seed}" if self.weights_file is None else "")
        self.run_name = run_name + ("" if precision == "float32" else f"-{precision}")


def _extract(bench, model, output_dir, progress, log):
    """Step 2: the benchmark's descriptors into `output_dir`, as the tfmet-extract it prints."""
    log(
        f"[2/4] Extracting descriptors with {model.backbone} ({model.tag} weights) into "
        f"{output_dir}"
    )
    log(
        f"      = tfmet-extract --info_dir {_q(bench.info_dir)} "
        f"--image_root {_q(bench.image_root)} --output_dir {_q(output_dir)} "
        f"--backbone {model.backbone}"
        + (
            f" --weights {_q(model.weights_flag)}"
            if model.weights_flag
            else f" --seed {model.seed}"
        )
        + ("" if model.multiscale else " --nomultiscale")
        + (f" --max_side {model.max_side}" if model.max_side else "")
        + ("" if model.precision == "float32" else f" --precision {model.precision}")
    )
    from tfmet.descriptors import extraction
    from tfmet.descriptors import spec as spec_lib

    # built exactly as the tfmet-extract printed above builds them
    extractor, spec = spec_lib.build_extractor(
        model.backbone,
        model.weights_file,
        seed=model.seed,
        scales=None if model.multiscale else (1.0,),
        max_side=model.max_side,
        precision=model.precision,
    )
    reports = extraction.extract_met(
        extractor, spec, bench.splits, bench.image_root, output_dir, progress=progress
    )
    for r in reports:
        if r.images:
            log(f"      {r.split}: {r.images} images, {r.images_per_second:.1f} images/s")


def _report(workdir, bench, model, data, result, pca_dim, examples, log):
    """Step 4: the kNN results file, the test metrics, the matches picture and TensorBoard;
    returns (the picture's path, the TensorBoard folder)."""
    from tfmet.retrieval import report as knn_report

    output_dir = os.path.join(workdir, "descriptors", model.run_name)
    knn_report.write_results(os.path.join(output_dir, "knn_results.json"), result)
    log("[4/4] Results on the test queries")
    log(f"      {model.run_name}: {figures.format_metrics(result.test)}")
    png = _matches_picture(bench, data, result, pca_dim, examples, model.seed)
    png_path = figures.write_png(os.path.join(workdir, f"matches-{model.run_name}.png"), png)
    tensorboard = _write_tensorboard(
        os.path.join(workdir, "tensorboard", model.run_name), result, png
    )
    log(f"      picture of queries and their top matches: {png_path}")
    log(f"      TensorBoard: tensorboard --logdir {_q(os.path.join(workdir, 'tensorboard'))}")
    return png_path, tensorboard


NAMES_FILE = "exhibit_names.json"
SERVE_SCRIPT = "serve.sh"


def _write_names(workdir, names):
    """The exhibits' names for tfmet-serve's page (`--names`): "chelsea" -> "Chelsea"."""
    from tfmet.io.atomic import save_json

    path = os.path.join(workdir, NAMES_FILE)
    save_json(path, {str(i): name.replace("_", " ").capitalize() for i, name in names.items()})
    return path


def write_serve_script(workdir, result):
    """Writes `<workdir>/serve.sh`, what `make serve` runs: `result`'s two serve commands as
    printed, the export skipped while it is newer than the run's kNN results; arguments of the
    script go to tfmet-serve (e.g. `--port 8081`)."""
    from tfmet.io.atomic import atomic_path

    export, serve = (line.strip() for line in result.serve_command.splitlines())
    results_json = os.path.join(result.descriptors, "knn_results.json")
    marker = os.path.join(result.export_dir, "saved_model.pb")
    script = (
        "#!/bin/sh\n# Written by tfmet-demo: its recogniser in tfmet-serve's page (make serve).\n"
        "set -e\n"
        f"[ {_q(marker)} -nt {_q(results_json)} ] || {export} --force\n"
        f'exec {serve} "$@"\n'
    )
    path = os.path.join(os.path.abspath(os.fspath(workdir)), SERVE_SCRIPT)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(script)
    return path


@dataclasses.dataclass
class _Benchmark:
    """The Met-format benchmark a demo run uses: where it is, its splits, names and captions."""

    info_dir: str
    image_root: str
    splits: list
    names: dict
    captions: dict


def _benchmark(workdir, info_dir, image_root, seed, benchmark_config, progress, log):
    """Step 1: the built demo benchmark (made if needed), or the user's Met-format folder."""
    from tfmet.descriptors import extraction

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
    return _Benchmark(info_dir, image_root, splits, names, captions)


def _classify(output_dir, info_dir, pca_dim, log):
    """Step 3: k and tau tuned on val by GAP, as tfmet-knn-eval --autotune; (data, result, dim)."""
    from tfmet.retrieval import evaluation

    data = evaluation.load_met_descriptors(output_dir, info_dir, splits=("train", "val", "test"))
    train = data["train"]
    if pca_dim is None:
        pca_dim = default_pca_dim(int(train.valid.sum()), train.descriptors.shape[1])
    log(
        "[3/4] kNN classifier: tuning k and tau on val by GAP ("
        + ("raw descriptors" if not pca_dim else f"PCA-whitened to {pca_dim}")
        + ")"
    )
    log(
        f"      = tfmet-knn-eval {_q(output_dir)} --info_dir {_q(info_dir)} --autotune "
        + ("--raw" if not pca_dim else f"-d {pca_dim}")
    )
    result = evaluation.knn_eval(data, dim=pca_dim or 512, raw=not pca_dim, autotune=True)
    log(f"      best k={result.k}, tau={result.tau:g}; val {figures.format_metrics(result.val)}")
    return data, result, pca_dim


def _matches_picture(bench, data, result, pca_dim, examples, seed):
    """PNG bytes: `examples` test queries beside their top database matches."""
    from tfmet.data import met

    train_split, _, test_split = bench.splits
    train = data["train"]
    pred, conf, labels = result.predictions["test"]
    rows = figures.choose_examples(pred, conf, labels, count=examples, seed=seed)
    database_paths = [
        path
        for path, ok in zip(
            met.image_paths(train_split, bench.image_root), train.valid, strict=True
        )
        if ok
    ]
    readable = [r for r in rows if data["test"].valid[r]]  # unreadable queries have no matches
    similarities, indices = _top_matches(data, readable, pca_dim)
    found = {r: (similarities[j], indices[j]) for j, r in enumerate(readable)}
    test_paths = met.image_paths(test_split, bench.image_root)
    queries = [
        {
            "path": test_paths[i],
            "label": int(labels[i]),
            "pred": int(pred[i]),
            "conf": float(conf[i]),
            "neighbors": found[i][1] if i in found else [],
            "similarities": found[i][0] if i in found else [],
            "caption": bench.captions.get(test_split.paths[i]),
        }
        for i in rows
    ]
    return figures.matches_figure(queries, database_paths, train.labels[train.valid], bench.names)


def _write_tensorboard(tensorboard, result, png):
    """The kNN evaluation's summaries, the metrics (fractions, as tfmet-knn-eval writes them),
    the picture and the explanation."""
    from tfmet.retrieval import report as knn_report

    knn_report.write_tensorboard(os.path.join(tensorboard, "knn_eval"), result)
    figures.write_tensorboard(
        tensorboard,
        {f"{split}/{name}": value for split in ("val", "test")
         for name, value in getattr(result, split).items()},
        png=png,
        text=figures.EXPLANATION,
    )  # fmt: skip
    return tensorboard


def _q(path):
    """`path` as a shell word: the printed commands run as printed, also where a folder has a
    space in its name."""
    return shlex.quote(os.fspath(path))


def serve_command(export_dir, export_flags, gallery_flags):
    """The tfmet-export and tfmet-serve lines that show a demo run's recogniser in a web page;
    the flags are shell words already (`_q`)."""
    return (
        f"  tfmet-export --kind recognizer --out {_q(export_dir)} {export_flags}\n"
        f"  tfmet-serve --model {_q(export_dir)} {gallery_flags}"
    )


def _model_flags(backbone, weights, seed, multiscale, max_side):
    return (
        f" --backbone {backbone}"
        + (f" --weights {_q(weights)}" if weights else f" --seed {seed}")
        + ("" if multiscale else " --nomultiscale")
        + (f" --max_side {max_side}" if max_side else "")
    )
