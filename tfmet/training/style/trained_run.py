"""A trained style run: its directory, config and classifier, and its evaluation on a split.

`tfmet-evaluate-style` is a thin wrapper around `evaluate`; `tfmet-predict` and the style export
find a run with `run_dir_of`, `read_run_config` and `load_classifier`. The run directory is the
one `tfmet.training.style.run.train` writes (see that module).
"""

import os

import numpy as np

from tfmet.io import saved_models
from tfmet.io.json_files import read_json
from tfmet.metrics.topk import bag_probabilities
from tfmet.retrieval import embedding_tools
from tfmet.training.style import checkpoints
from tfmet.training.style import evaluate as style_eval
from tfmet.training.style.model import StyleClassifier
from tfmet.training.style.run import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    build_classifier,
    default_cache_dir,
    load_records,
    load_split,
    split_features,
    split_labels,
)


def run_dir_of(path):
    """The run directory of a run dir, its classifier.keras or a checkpoint in it."""
    path = os.fspath(path)
    candidates = [path] if os.path.isdir(path) else []
    candidates += [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, CONFIG_FILE)):
            return candidate
    raise FileNotFoundError(f"{path}: not inside a tfmet-train-style run (no {CONFIG_FILE})")


def read_run_config(workdir):
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a tfmet-train-style run: no {CONFIG_FILE}")
    config = read_json(path, "run config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: not a tfmet-train-style run config")
    return config


def load_classifier(path, trust_model=False):
    """A trained `StyleClassifier` from a run directory, a `.keras` file or a checkpoint.

    Checkpoints (`checkpoints/*.weights.npz` of a run, or a Keras `.weights.h5` of the whole
    classifier) are loaded into a classifier rebuilt from the run's config.json. Hub backbones
    are SavedModels (programs): loading one from a `.keras` file needs `trust_model=True`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, CLASSIFIER_FILE)
        if not os.path.exists(candidate):
            raise FileNotFoundError(f"{path}: no {CLASSIFIER_FILE} (has the run finished?)")
        path = candidate
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if path.endswith((".weights.npz", ".weights.h5")):
        workdir = run_dir_of(path)
        config = read_run_config(workdir)
        records = load_records(config["dataset"])
        classifier = build_classifier(
            config["model"], records.class_names, config["train"].get("seed", 0)
        )
        if path.endswith(".weights.h5"):
            classifier.load_weights(path)
            return classifier
        kind = "classifier"
        if checkpoints.has_checkpoint(workdir):
            kind = checkpoints.read_state(workdir).get("model", "classifier")
        checkpoints.load_weights(classifier.head if kind == "head" else classifier, path)
        return classifier
    if not path.endswith(".keras"):
        raise ValueError(
            f"{path}: expected a run directory, a .keras file or a .weights.npz/.weights.h5 "
            "checkpoint"
        )
    try:
        model = saved_models.load_keras_file(path, "Keras model", safe_mode=not trust_model)
    except ValueError as e:
        if "safe mode" in str(e):
            raise ValueError(
                f"{path} contains a hub module (a SavedModel program); load it only if you "
                "trust the file (--trust_model)"
            ) from None
        raise
    if not isinstance(model, StyleClassifier):
        raise ValueError(f"{path}: holds a {type(model).__name__}, not a StyleClassifier")
    return model


def evaluate(
    workdir,
    split="test",
    flip_bagging=True,
    output_dir=None,
    model_path=None,
    cache_dir=None,
    outliers_k=0,
    batch_size=32,
    trust_model=False,
):
    """Evaluates a trained run on one split; writes and returns the report.

    Writes into `output_dir` (default `<workdir>/eval_<split>`): metrics.json (top-1/3/5 per
    attribute, plain and flip-bagged), per_class_<attribute>.csv, confusion_<attribute>.csv/png
    (of the bagged predictions when flip bagging is on), and with `outliers_k` > 0
    outliers_<attribute>.csv.
    """
    config = read_run_config(workdir)
    classifier = load_classifier(model_path or workdir, trust_model=trust_model)
    records = load_records(config["dataset"])
    splits = load_split(config["dataset"], records, workdir)
    if split not in splits or not len(splits[split]):
        raise ValueError(f"split {split!r} is empty or absent in {workdir} (have {list(splits)})")
    image_size = int(config["model"]["image_size"])
    if cache_dir is None:
        cache_dir = config.get("cache_dir") or default_cache_dir()
    features, kept, errors, probabilities, bagged = _split_probabilities(
        classifier, records, split, splits[split], (image_size, batch_size, cache_dir), flip_bagging
    )
    reports, matrices = _attribute_reports(classifier, records, kept, probabilities, bagged)
    output_dir = output_dir or os.path.join(workdir, f"eval_{split}")
    style_eval.write_evaluation(
        output_dir,
        reports,
        matrices,
        records.class_names,
        split=split,
        images=len(kept),
        unreadable=[{"path": records.paths[i], "reason": r} for i, _, r in errors],
        flip_bagging=bool(flip_bagging),
    )
    if outliers_k:
        _write_outliers(output_dir, classifier.attributes, records, kept, features, outliers_k)
    return reports


def _split_probabilities(classifier, records, split, indices, extraction, flip):
    """Features of records[indices] (`split`) and their class probabilities per attribute; with
    `flip` also the probabilities bagged with the mirrored images' (else None). `extraction`:
    (image_size, batch_size, cache_dir) of `split_features`."""
    features, kept, errors = split_features(classifier, records, indices, *extraction)
    logits = {a: np.asarray(v) for a, v in classifier.head(features, training=False).items()}
    probabilities = {a: np.asarray(bag_probabilities(v)) for a, v in logits.items()}
    bagged = None
    if flip:
        flipped, kept_flipped, _ = split_features(classifier, records, kept, *extraction, flip=True)
        if len(kept_flipped) != len(kept):
            raise ValueError(f"{split}: an image became unreadable during evaluation")
        flipped_logits = classifier.head(flipped, training=False)
        bagged = {a: np.asarray(bag_probabilities(logits[a], flipped_logits[a])) for a in logits}
    return features, kept, errors, probabilities, bagged


def _attribute_reports(classifier, records, kept, probabilities, bagged):
    """attribute -> report (plain top-k, and flip-bagged ones with the bagged per-class rows),
    attribute -> confusion matrix (of the bagged predictions when there are some)."""
    labels = split_labels(records, kept)
    reports, matrices = {}, {}
    for a in classifier.attributes:
        report, matrix = style_eval.evaluate_scores(
            probabilities[a], labels[a], records.class_names[a]
        )
        if bagged is not None:
            bagged_report, matrix = style_eval.evaluate_scores(
                bagged[a], labels[a], records.class_names[a]
            )
            report = {
                **{k: v for k, v in report.items() if k != "per_class"},
                "flip_bagged": {k: v for k, v in bagged_report.items() if k != "per_class"},
                "per_class": bagged_report["per_class"],
            }
        reports[a], matrices[a] = report, matrix
    return reports, matrices


def _write_outliers(output_dir, attributes, records, kept, features, k):
    """outliers_<attribute>.csv: how far each image lies from its class's k nearest images."""
    for a in attributes:
        names = [records.class_names[a][v] if v >= 0 else "" for v in records.labels[a][kept]]
        scores = embedding_tools.outlier_scores(features, np.array(names), k=k)
        embedding_tools.write_outlier_csv(
            os.path.join(output_dir, f"outliers_{a}.csv"),
            [records.paths[i] for i in kept],
            names,
            scores,
        )
