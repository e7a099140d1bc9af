"""A style-classification run from a config: data, split, model, training, evaluation, prediction.

The program `tfmet-train-style` is a thin wrapper around `train` (`tfmet-evaluate-style` around
`tfmet.training.style.trained_run.evaluate`, `tfmet-predict` around
`tfmet.training.style.predict`). A run directory holds:

    config.json          the config the run was trained with (evaluate / predict read it)
    split.json           the split, unless the config names a shared split file
    bad_images.json      unreadable images, skipped
    checkpoints/         last + best weights, optimizer state, state.json (for --resume)
    tensorboard/         scalars, confusion matrices, embedding projector
    classifier.keras     the trained classifier (images in [0, 255] -> logits per attribute)
    eval_<split>/        metrics.json, per-class CSVs, confusion matrices (CSV + PNG)

Training modes (`train.mode`):

- "bottleneck": the backbone is frozen; pooled features of every image are computed once and
  cached (`tfmet.training.style.bottleneck`), then only the head trains, in seconds.
- "finetune": images flow through the backbone every step; the top of the backbone trains
  (`train.trainable_blocks` / `trainable_fraction` / `trainable_patterns`), with optional
  augmentation.
- "auto": bottleneck when nothing in the backbone trains and there is no augmentation.
"""

import dataclasses
import json
import math
import os
import time

import keras
import numpy as np
from absl import logging

from tfmet.backbones.precision import model_precision, set_precision
from tfmet.data import style_datasets, style_images, style_splits
from tfmet.io.atomic import atomic_path, clean_stale_temporaries, save_json
from tfmet.precision import check_precision
from tfmet.training import distribute, rundir
from tfmet.training.style import bottleneck as style_bottleneck
from tfmet.training.style import checkpoints
from tfmet.training.style import finetune as style_finetune
from tfmet.training.style import fit as style_train
from tfmet.training.style.config import check_config
from tfmet.training.style.model import StyleClassifier

MODES = ("auto", "bottleneck", "finetune")
CLASSIFIER_FILE = "classifier.keras"
CONFIG_FILE = "config.json"
# Config entries a resumed run may change.
RESUMABLE_CHANGES = ("train.epochs", "train.patience", "train.strategy")
# `StyleClassifier`'s constructor options besides its two layers, each kept as the attribute of
# the same name (the Keras layer contract), so a copy takes them by name
_CLASSIFIER_OPTIONS = ("pooling", "gem_p", "preprocessing", "backbone_name", "batchnorm", "name")


def default_cache_dir():
    return os.environ.get(
        "TFMET_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tfmet")
    )


def load_records(dataset_config):
    """The dataset of a config's `dataset` section, restricted to its attributes."""
    c = dataset_config
    if not c.get("root"):
        raise ValueError("config.dataset.root is empty: set it to the dataset's directory")
    return style_datasets.load_dataset(
        c["format"],
        c["root"],
        list_dir=c.get("list_dir") or None,
        classes_file=c.get("classes_file") or None,
        csv_path=c.get("csv") or None,
        attributes=list(c.get("attributes") or []) or None,
    )


def load_split(dataset_config, records, workdir):
    path = dataset_config.get("split_file") or os.path.join(workdir, "split.json")
    return style_splits.load_or_create_split(
        records,
        path,
        fractions=tuple(dataset_config.get("split_fractions", (0.8, 0.1, 0.1))),
        seed=int(dataset_config.get("split_seed", 0)),
        stratify=dataset_config.get("stratify") or records.attributes[0],
    )


def resolve_mode(train_config):
    mode = train_config.get("mode", "auto")
    if mode not in MODES:
        raise ValueError(f"train.mode must be one of {MODES}. Received: {mode!r}")
    augment = train_config.get("augment", "none")
    if augment not in style_images.AUGMENTATIONS:
        raise ValueError(
            f"train.augment must be one of {style_images.AUGMENTATIONS}. Received: {augment!r}"
        )
    trains_backbone = bool(
        train_config.get("trainable_blocks")
        or train_config.get("trainable_fraction")
        or train_config.get("trainable_patterns")
    )
    if mode == "auto":
        return "finetune" if trains_backbone or augment != "none" else "bottleneck"
    if mode == "bottleneck" and (trains_backbone or augment != "none"):
        raise ValueError(
            "train.mode='bottleneck' trains the head on fixed cached features: it cannot train "
            "backbone blocks or use augmentation (use mode 'finetune' or 'auto')"
        )
    return mode


def settings_from_config(train_config):
    fields = {f.name for f in dataclasses.fields(style_train.TrainSettings)}
    return style_train.TrainSettings(**{k: v for k, v in train_config.items() if k in fields})


def build_classifier(model_config, class_names, seed=0):
    """A `StyleClassifier` from a config's `model` section (weights: a local file, "imagenet"
    for EfficientNet-Lite0's packaged weights, or none).

    Keras's random seed is set to `seed` first, so the randomly initialised parts (the head, a
    backbone without a weights file) are the same every time the run's model is rebuilt: a
    head-only checkpoint then loads onto the backbone it was trained on.
    """
    precision = check_model_precision(model_config)
    keras.utils.set_random_seed(int(seed))
    classifier = StyleClassifier.from_registry(
        model_config["backbone"],
        class_names,
        weights=model_config.get("weights") or None,
        dropout=float(model_config.get("dropout", 0.0)),
        pooling=model_config.get("pooling", "gap"),
        gem_p=float(model_config.get("gem_p", 3.0)),
        name="style_classifier",
    )
    size = int(model_config["image_size"])
    classifier.build((None, size, size, 3))
    set_precision(classifier.backbone, precision)
    return classifier


def check_model_precision(model_config):
    """The config's `model.precision` (float32 when absent); ValueError naming it if unknown."""
    return check_precision(model_config.get("precision", "float32"), "config `model.precision`")


def save_classifier(classifier, path, image_size):
    """Saves an uncompiled copy of `classifier` (same layers, no optimizer state) atomically."""
    options = {option: getattr(classifier, option) for option in _CLASSIFIER_OPTIONS}
    copy = StyleClassifier(classifier.backbone, classifier.head, **options)
    copy.build((None, image_size, image_size, 3))
    copy.pool.set_weights(classifier.pool.get_weights())
    with atomic_path(path) as tmp:
        copy.save(tmp)


def feature_cache(cache_dir, classifier, image_size, flip):
    """The bottleneck cache of `classifier`'s feature extractor (backbone + pooling)."""
    if not cache_dir:
        return None
    key = style_bottleneck.extractor_key(
        classifier.backbone_name,
        classifier.backbone,
        classifier.pooling,
        image_size,
        flip=flip,
        extra={"pooling_sha256": style_bottleneck.weights_sha256(classifier.pool)}
        | _precision_key(classifier),
    )
    return style_bottleneck.BottleneckCache(os.path.join(cache_dir, "bottlenecks"), key)


def _precision_key(classifier):
    """{"precision": ...} for a reduced-precision backbone; {} for float32 (same keys as before)."""
    precision = model_precision(classifier.backbone)
    return {} if precision == "float32" else {"precision": precision}


def split_features(classifier, records, indices, image_size, batch_size, cache_dir, flip=False):
    """Features of records[indices]; returns (features, kept indices, errors)."""
    paths = records.abspaths(indices)
    cache = feature_cache(cache_dir, classifier, image_size, flip)
    features, ok, errors = style_bottleneck.extract_features(
        lambda images: classifier.features(images, training=False),
        paths,
        image_size,
        batch_size=batch_size,
        flip=flip,
        cache=cache,
    )
    indices = np.asarray(indices)
    return features[ok], indices[ok], [(int(indices[i]), p, r) for i, p, r in errors]


def split_labels(records, indices):
    """attribute -> the labels of records[indices]."""
    return {a: records.labels[a][indices] for a in records.attributes}


def _projector_metadata(records, indices):
    header = ["path", *records.attributes]
    rows = []
    for i in indices:
        row = [records.paths[i]]
        for a in records.attributes:
            label = records.labels[a][i]
            row.append(records.class_names[a][label] if label >= 0 else "")
        rows.append(row)
    return header, rows


def _check_resume_config(workdir, config_dict):
    rundir.check_resume(os.path.join(workdir, CONFIG_FILE), config_dict, RESUMABLE_CHANGES)


def _write_bad_images(workdir, errors, records):
    save_json(
        os.path.join(workdir, "bad_images.json"),
        [{"path": records.paths[i], "reason": reason} for i, _, reason in sorted(errors)],
    )
    if errors:
        logging.warning("%d unreadable image(s) skipped; see bad_images.json", len(errors))


def train(config, workdir, resume=False):
    """Trains the classifier a config describes; returns a summary dict.

    `train.strategy` ("default", "mirrored", "multi_worker"; `tfmet.training.distribute`)
    builds and trains the model under that tf.distribute strategy: `train.batch_size` stays
    the global batch, split across the replicas by `keras.Model.fit`, and the loss is scaled
    by the global number of labelled rows (`MaskedSparseCrossEntropy`), so the run equals the
    single-device one up to float rounding. In a multi-worker run only the chief writes
    `workdir`; the other workers write to a temporary copy.

    Raises:
      ValueError / FileNotFoundError: a bad config, dataset or workdir (clear messages).
    """
    start = time.time()
    check_config(config)
    config_dict = rundir.config_record(config)
    check_model_precision(config_dict["model"])  # before anything is written
    strategy = distribute.make_strategy(config_dict["train"].get("strategy", "default"))
    with distribute.worker_workdir(workdir, strategy, resume) as writable, strategy.scope():
        return _train(config_dict, writable, resume, start)


def _train(config_dict, workdir, resume, start):
    os.makedirs(workdir, exist_ok=True)
    clean_stale_temporaries(workdir)  # what a killed run was writing
    if resume:
        _check_resume_config(workdir, config_dict)
    elif checkpoints.has_checkpoint(workdir):
        raise ValueError(
            f"{workdir} already holds a training checkpoint; pass --resume to continue it or "
            "choose a new workdir"
        )
    data_c, model_c, train_c = config_dict["dataset"], config_dict["model"], config_dict["train"]
    mode = resolve_mode(train_c)
    settings = settings_from_config(train_c)
    keras.utils.set_random_seed(settings.seed)
    records = load_records(data_c)
    splits = load_split(data_c, records, workdir)
    for name in ("train", "val"):
        if not len(splits.get(name, [])):
            raise ValueError(f"the {name} split is empty; check the dataset and split fractions")
    save_json(os.path.join(workdir, CONFIG_FILE), config_dict)
    classifier = build_classifier(model_c, records.class_names, settings.seed)
    image_size = int(model_c["image_size"])
    cache_dir = config_dict.get("cache_dir") or default_cache_dir()
    logging.info(
        "Training %s (%s) on %d train / %d val images, mode %s",
        model_c["backbone"],
        ", ".join(f"{a}: {len(n)} classes" for a, n in records.class_names.items()),
        len(splits["train"]),
        len(splits["val"]),
        mode,
    )
    if mode == "bottleneck":
        state, val_indices, errors = _train_bottleneck(
            classifier,
            records,
            splits,
            settings,
            workdir,
            resume,
            image_size,
            cache_dir,
            int(config_dict.get("eval", {}).get("batch_size", 32)),
        )
    else:
        state, val_indices, errors = _train_finetune(
            classifier, records, splits, settings, train_c, workdir, resume, image_size
        )
    _write_bad_images(workdir, errors, records)
    save_classifier(classifier, os.path.join(workdir, CLASSIFIER_FILE), image_size)
    summary = {
        "mode": mode,
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_top1": state["best_top1"],
        "stopped_early": state["stopped_early"],
        "val_images": len(val_indices),
        "bad_images": len(errors),
        "seconds": time.time() - start,
    }
    save_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _train_bottleneck(
    classifier, records, splits, settings, workdir, resume, image_size, cache_dir, batch_size
):
    t0 = time.time()
    train_x, train_i, train_err = split_features(
        classifier, records, splits["train"], image_size, batch_size, cache_dir
    )
    val_x, val_i, val_err = split_features(
        classifier, records, splits["val"], image_size, batch_size, cache_dir
    )
    logging.info("Bottleneck features ready in %.1f s", time.time() - t0)
    t0 = time.time()
    state = style_train.train_head(
        classifier.head,
        train_x,
        split_labels(records, train_i),
        val_x,
        split_labels(records, val_i),
        settings,
        workdir,
        resume=resume,
        projector_metadata=_projector_metadata(records, val_i),
    )
    logging.info("Head trained in %.1f s", time.time() - t0)
    return state, val_i, train_err + val_err


def _train_finetune(classifier, records, splits, settings, train_c, workdir, resume, image_size):
    names = style_finetune.set_trainable(
        classifier,
        trainable_blocks=int(train_c.get("trainable_blocks") or 0),
        trainable_fraction=float(train_c.get("trainable_fraction") or 0.0),
        trainable_patterns=list(train_c.get("trainable_patterns") or []),
        batchnorm=train_c.get("batchnorm", "frozen"),
    )
    logging.info("Trainable backbone part: %s", names or "none (head only)")
    indices = np.concatenate([splits["train"], splits["val"]])
    bad_file = os.path.join(workdir, "bad_images.json")
    if resume and os.path.exists(bad_file):  # the interrupted run already checked every image
        with open(bad_file, encoding="utf-8") as f:
            known = {row["path"]: row["reason"] for row in json.load(f)}
        errors = [
            (int(i), records.abspath(i), known[records.paths[i]])
            for i in indices
            if records.paths[i] in known
        ]
    else:
        errors = style_images.scan_images(records.abspaths(indices))
        errors = [(int(indices[i]), p, r) for i, p, r in errors]
        _write_bad_images(workdir, errors, records)
    bad = {i for i, _, _ in errors}
    train_i = np.array([i for i in splits["train"] if i not in bad], np.int64)
    val_i = np.array([i for i in splits["val"] if i not in bad], np.int64)
    augment = style_images.make_augmenter(train_c.get("augment", "none"), image_size, settings.seed)
    train_data = style_images.image_dataset(
        records.abspaths(train_i),
        split_labels(records, train_i),
        image_size,
        settings.batch_size,
        shuffle=True,
        seed=settings.seed,
        augment=augment,
        repeat=True,
    )
    val_labels = split_labels(records, val_i)
    val_data = style_images.image_dataset(
        records.abspaths(val_i), val_labels, image_size, settings.batch_size
    )
    steps = max(1, math.ceil(len(train_i) / settings.batch_size))
    state = style_train.train_classifier(
        classifier,
        train_data,
        steps,
        val_data,
        val_labels,
        settings,
        workdir,
        resume=resume,
        projector_metadata=_projector_metadata(records, val_i),
    )
    return state, val_i, errors
