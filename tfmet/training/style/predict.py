"""Prediction with a trained style classifier: top-k labels, flip bagging, nearest paintings.

`load_predictor` accepts a run directory, its `classifier.keras`, a checkpoint of the run, or an
exported SavedModel directory (see `SAVED_MODEL_CONTRACT`).
"""

import os

import numpy as np

from tfmet.data import images as image_io
from tfmet.data import style_images
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.io import saved_models
from tfmet.metrics.topk import bag_probabilities
from tfmet.retrieval import embedding_tools
from tfmet.training.style.run import (
    CLASSIFIER_FILE,
    default_cache_dir,
    load_records,
    load_split,
    split_features,
)
from tfmet.training.style.trained_run import load_classifier, read_run_config, run_dir_of


class Predictor:
    """Images -> class probabilities per attribute, from a classifier or an exported SavedModel.

    Attributes:
      class_names: attribute -> names.
      image_size: the side images are resized to.
    """

    def __init__(self, predict_logits, class_names, image_size, classifier=None):
        self._predict_logits = predict_logits
        self.class_names = class_names
        self.image_size = int(image_size)
        self.classifier = classifier

    def probabilities(self, images, flip_bagging=False):
        """images [n, S, S, 3] in [0, 255] -> {attribute: probabilities [n, classes]}."""
        logits = self._predict_logits(images)
        if not flip_bagging:
            return {a: np.asarray(bag_probabilities(v)) for a, v in logits.items()}
        mirrored = self._predict_logits(np.ascontiguousarray(np.asarray(images)[:, :, ::-1]))
        return {a: np.asarray(bag_probabilities(logits[a], mirrored[a])) for a in logits}

    def features(self, images):
        """Pooled features [n, C] (needs a Keras classifier, not a SavedModel)."""
        if self.classifier is None:
            raise ValueError("pooled features need a Keras classifier, not a SavedModel")
        return np.asarray(self.classifier.features(images, training=False))


SAVED_MODEL_CONTRACT = """a style SavedModel written by `tfmet-export --kind style` has an `images`
signature taking `images` (float32 [batch, size, size, 3] in [0, 255]) and returning one logits
tensor per attribute, and `assets/tfmet_metadata.json` with {"kind": "style", "class_names":
{attribute: [names]}, "image_size": size}"""


def load_predictor(path, image_size=None, trust_model=False):
    """A `Predictor` from a run directory, a `.keras` / `.weights.h5` file or a SavedModel dir."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, CLASSIFIER_FILE)):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return _saved_model_predictor(path)
        raise FileNotFoundError(
            f"{path}: neither an exported SavedModel (no saved_model.pb) nor a training run "
            f"(no {CLASSIFIER_FILE}); export the model with tfmet-export first, or pass a "
            ".keras checkpoint"
        )
    classifier = load_classifier(path, trust_model=trust_model)
    if image_size is None:
        try:
            image_size = read_run_config(run_dir_of(path))["model"]["image_size"]
        except FileNotFoundError:
            raise ValueError(
                f"{path}: no run config.json beside the model to take the image size from"
            ) from None

    def predict_logits(images):
        return {a: np.asarray(v) for a, v in classifier(images, training=False).items()}

    return Predictor(predict_logits, classifier.class_names, image_size, classifier=classifier)


def _check_metadata(path, metadata, signature):
    """The metadata must describe the graph: its image size and each attribute's class count
    (a tampered or mismatched metadata file would silently change or mislabel predictions)."""
    shape = signature.structured_input_signature[1]["images"].shape.as_list()
    size = metadata.get("image_size")
    if shape[1:3] != [size, size]:
        raise ValueError(
            f"{path}: metadata says image_size {size!r}, the graph takes "
            f"{shape[1]}x{shape[2]} images"
        )
    names = metadata["class_names"]
    if not isinstance(names, dict):
        raise ValueError(f"{path}: metadata 'class_names' must map attributes to name lists")
    for attribute, spec in signature.structured_outputs.items():
        count = spec.shape.as_list()[-1]
        if attribute in names and len(names[attribute]) != count:
            raise ValueError(
                f"{path}: metadata lists {len(names[attribute])} class names for "
                f"{attribute!r}, the model has {count} outputs"
            )


def _saved_model_predictor(path):
    try:
        metadata = saved_models.read_export_metadata(path, f"; {SAVED_MODEL_CONTRACT}")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if metadata.get("kind") != "style" or "class_names" not in metadata:
        raise ValueError(
            f"{path}: a {metadata.get('kind', 'unknown')!r} export, not a style classifier; "
            f"{SAVED_MODEL_CONTRACT}"
        )
    signature = saved_models.signature(saved_models.load_saved_model(path), path, "images")
    _check_metadata(path, metadata, signature)

    def predict_logits(images):
        import tensorflow as tf

        outputs = signature(images=tf.constant(np.asarray(images, np.float32)))
        missing = [a for a in metadata["class_names"] if a not in outputs]
        if missing:
            raise ValueError(f"{path}: the images signature lacks outputs {missing}")
        return {a: outputs[a].numpy() for a in metadata["class_names"]}

    return Predictor(predict_logits, metadata["class_names"], metadata["image_size"])


def read_images(paths, image_size, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES):
    """Decodes and resizes image files -> (images [n, S, S, 3], readable paths, errors).

    A file that is missing, not a regular file (a FIFO, a device), over `max_bytes`, declaring
    more than `max_pixels` pixels (checked before decoding) or undecodable is an error
    (path, reason), not an image.
    """
    images, good, errors = [], [], []
    for path in paths:
        if not os.path.exists(path):
            errors.append((path, "file not found"))
            continue
        image, reason = image_io.read_image(path, max_pixels=max_pixels, max_bytes=max_bytes)
        if image is None:
            errors.append((path, reason))
            continue
        images.append(np.asarray(style_images.resize_image(image, image_size)))
        good.append(path)
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)
    return stacked, good, errors


def top_k_labels(probabilities, class_names, k):
    """[(name, probability)] * k for one row, best first (ties: lower class index first)."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


def nearest_in_run(
    workdir, classifier, query_features, split="train", k=5, cache_dir=None, batch_size=32
):
    """Nearest paintings of `query_features` among a run's `split` images.

    The collection's features come from the bottleneck cache (computed on first use).

    Returns:
      per query, [(relative path, first-attribute label, cosine similarity)] best first.
    """
    config = read_run_config(workdir)
    records = load_records(config["dataset"])
    splits = load_split(config["dataset"], records, workdir)
    image_size = int(config["model"]["image_size"])
    if cache_dir is None:
        cache_dir = config.get("cache_dir") or default_cache_dir()
    features, kept, _ = split_features(
        classifier, records, splits[split], image_size, batch_size, cache_dir
    )
    attribute = records.attributes[0]
    names = [
        records.class_names[attribute][v] if v >= 0 else "" for v in records.labels[attribute][kept]
    ]
    index = embedding_tools.NearestPaintings(features, [records.paths[i] for i in kept], names)
    return index.query(query_features, k=k)
