"""The data of contrastive training: Met images, initial descriptors, projector init, kNN check."""

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmet import metrics
from tfmet.data import descriptor_store as store_lib
from tfmet.data import met
from tfmet.io import safe_pickle
from tfmet.retrieval import KnnClassifier, PCAWhitening


@dataclasses.dataclass(frozen=True)
class MetTrainingData:
    """The database (training) images and the validation queries.

    Attributes:
      train_files, val_files: full image paths, JSON order.
      train_paths, val_paths: the JSON paths (recorded in descriptor manifests).
      train_labels, val_labels: int64 labels; -1 marks distractor queries.
      train_source, val_source: the ground-truth files read.
    """

    train_files: list
    train_paths: list
    train_labels: np.ndarray
    train_source: str
    val_files: list
    val_paths: list
    val_labels: np.ndarray
    val_source: str


def load_met_training_data(info_dir, image_root, mini=False):
    """Reads the (mini) database and the validation queries of a Met tree."""
    train = met.load_split(info_dir, "train", mini=mini)
    val = met.load_split(info_dir, "val")
    return MetTrainingData(
        train_files=met.image_paths(train, image_root),
        train_paths=list(train.paths),
        train_labels=train.labels,
        train_source=os.path.abspath(train.source),
        val_files=met.image_paths(val, image_root),
        val_paths=list(val.paths),
        val_labels=val.labels,
        val_source=os.path.abspath(val.source),
    )


def pooled_descriptor(embedder, images):
    """L2(GeM(backbone(x))) of raw images in [0, 255]: the descriptor before any projector."""
    features = embedder.backbone(embedder.preprocess(images), training=False)
    return embedder.normalize(embedder.pool(features))


class _PooledExtractor(tf.Module):
    """Single-scale descriptors before the projector (the reference mines epoch 1 with them)."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.extract = tf.function(
            lambda images: pooled_descriptor(self.embedder, images),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            reduce_retracing=True,
        )

    def __call__(self, images):
        return self.extract(tf.convert_to_tensor(images, tf.float32))


def pooled_dim(embedder):
    """Dimension of the descriptor before the projector (the backbone's channels)."""
    return int(embedder.backbone.compute_output_shape((None, None, None, 3))[-1])


def read_initial_descriptors(path, count, dim):
    """Reads single-scale database descriptors to mine the first epoch's pairs with.

    `path` is a folder holding a tfmet descriptor store of the train split
    (`train_descriptors.npy` + `train_manifest.json`) or the reference's `descriptors.pkl`
    (read without executing pickle code), or that `.pkl` file itself.

    Returns:
      (descriptors float32 [count, dim], valid bool [count]).

    Raises:
      FileNotFoundError / ValueError naming the file and the problem.
    """
    path = os.fspath(path)
    pickle_path = path if path.endswith(".pkl") else os.path.join(path, "descriptors.pkl")
    if os.path.isdir(path) and store_lib.has_store(path, "train"):
        store = store_lib.read_store(path, "train", mmap=False)
        source = store_lib.array_path(path, "train")
        descriptors, valid = np.asarray(store.descriptors), store.valid
        scales = store.manifest.get("scales")
        if scales is not None and [float(s) for s in scales] != [1.0]:
            absl_logging.warning(
                "%s: descriptors were extracted at scales %s; the reference mines with "
                "single-scale descriptors",
                source,
                scales,
            )
    elif os.path.isfile(pickle_path):
        source = pickle_path
        arrays = safe_pickle.load_reference_descriptors(pickle_path)
        if "train_descriptors" not in arrays:
            raise ValueError(f"{pickle_path}: no 'train_descriptors' entry")
        descriptors = arrays["train_descriptors"]
        valid = np.ones(descriptors.shape[0], bool)
    else:
        raise FileNotFoundError(
            f"{path}: no initial descriptors (expected a tfmet store with train_manifest.json "
            "or the reference's descriptors.pkl)"
        )
    if descriptors.shape != (count, dim):
        raise ValueError(
            f"{source}: initial descriptors have shape {descriptors.shape}; the database has "
            f"{count} images and the model's descriptors {dim} dimensions"
        )
    if not np.all(np.isfinite(descriptors[valid])):
        raise ValueError(f"{source}: initial descriptors contain NaN or infinite values")
    return np.ascontiguousarray(descriptors, np.float32), np.asarray(valid, bool)


def init_projector_from_pca(embedder, descriptors):
    """Initialises the embedder's projector from PCA-whitening of `descriptors` (all dims).

    The reference learns PCA-whitening (shrinkage 1, every dimension kept) on the initial
    database descriptors and sets the projector to x -> (x - m) P.
    """
    if embedder.projector is None:
        raise ValueError("the embedder has no projector (set `emb_proj` to add one)")
    whitening = PCAWhitening(dim=embedder.projector_dim, shrinkage=1.0).fit(descriptors)
    embedder.projector.set_pca(whitening.mean, whitening.projection)
    return whitening


def knn_validation(train_descriptors, train_labels, val_descriptors, val_labels, backend):
    """GAP / GAP- / ACC of the K=1, tau=1 kNN classifier (the reference's per-epoch check)."""
    classifier = KnnClassifier(k=1, tau=1.0, backend=backend).fit(train_descriptors, train_labels)
    pred, conf = classifier.predict(val_descriptors)
    return metrics.evaluate(pred, conf, val_labels)
