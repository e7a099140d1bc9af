"""Bottleneck features: pooled backbone features computed once per image and cached on disk.

This is TF-Hub retrain.py's workflow without its pitfalls: the cache is keyed by what determines
a feature, not by file name. A cache directory holds one sub-directory per *extractor key*
(backbone name, a SHA-256 of its weights, pooling, input size, resize and flip), described by its
`key.json`, and inside it `.npz` shards of `hashes` (SHA-256 of each image file's bytes, as
fixed-width bytes) and `features` (float32 [n, d]). Shards are written atomically and never
modified, so an interrupted run loses at most the current shard, concurrent runs cannot corrupt
each other, and a renamed, moved or duplicated image is found again by its content. No pickle.
"""

import glob
import hashlib
import json
import os
import time
import uuid

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.data import images as image_io
from tfmet.data.style_images import resize_image
from tfmet.io import hashing
from tfmet.io.atomic import atomic_path, save_json

CACHE_FORMAT = "tfmet-bottlenecks"
HASH_BYTES = 64  # hex digest of SHA-256


def file_sha256(path, chunk_size=1 << 20):
    """Hex SHA-256 of a file's bytes; None when it cannot be read."""
    try:
        return hashing.file_sha256(path, chunk_size)
    except OSError:
        return None


def weights_sha256(model):
    """SHA-256 over a model's variables (shape, dtype, bytes) in the model's weight order.

    Variable names are left out: they change when a model is saved and reloaded.
    """
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class BottleneckCache:
    """Features by image content hash, for one extractor key, under `directory`.

    Args:
      directory: the cache root (shared by every extractor).
      key: a JSON-serialisable dict describing the extractor; equal keys share features.
    """

    def __init__(self, directory, key):
        self.key = dict(key)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = os.path.join(os.fspath(directory), digest[:24])
        self._features = None

    def _load(self):
        if self._features is not None:
            return self._features
        self._features = {}
        key_file = os.path.join(self.path, "key.json")
        if os.path.exists(key_file):
            with open(key_file, encoding="utf-8") as f:
                stored = json.load(f).get("key")
            if stored != json.loads(json.dumps(self.key)):
                raise ValueError(
                    f"bottleneck cache {self.path}: key.json describes another extractor "
                    f"({stored}); delete the directory"
                )
        for shard in sorted(glob.glob(os.path.join(self.path, "shard-*.npz"))):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    hashes, features = data["hashes"], data["features"]
            except (OSError, ValueError, KeyError) as e:
                logging.warning("Ignoring unreadable bottleneck shard %s: %s", shard, e)
                continue
            for h, f in zip(hashes, features, strict=True):
                self._features[h.decode("ascii")] = f
        return self._features

    def __len__(self):
        return len(self._load())

    def get(self, image_hash):
        return self._load().get(image_hash)

    def add(self, hashes, features):
        """Stores features [n, d] of images with content `hashes` as a new shard."""
        if not len(hashes):
            return
        features = np.asarray(features, np.float32)
        os.makedirs(self.path, exist_ok=True)
        key_file = os.path.join(self.path, "key.json")
        if not os.path.exists(key_file):
            save_json(key_file, {"format": CACHE_FORMAT, "format_version": 1, "key": self.key})
        name = f"shard-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        with atomic_path(os.path.join(self.path, name)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, hashes=np.array(hashes, dtype=f"S{HASH_BYTES}"), features=features)
        cache = self._load()
        for h, f in zip(hashes, features, strict=True):
            cache[h] = f


def extractor_key(backbone_name, backbone, pooling, image_size, flip=False, extra=None):
    """The cache key of a feature extractor."""
    return {
        "backbone": backbone_name,
        "weights_sha256": weights_sha256(backbone),
        "pooling": pooling,
        "image_size": int(image_size),
        "resize": "bilinear_antialias_squash",
        "flip": bool(flip),
        **(extra or {}),
    }


def _progress(done, total, start):
    elapsed = max(time.time() - start, 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 else float("inf")
    logging.info("features: %d/%d images, %.1f images/s, ETA %.0f s", done, total, rate, eta)


def _cached_rows(cache, hashes):
    """({index: cached features}, [indices to compute]) of files with these content hashes."""
    rows, todo = {}, []
    for i, h in enumerate(hashes):
        cached = cache.get(h) if (cache is not None and h is not None) else None
        if cached is not None:
            rows[i] = cached
        else:
            todo.append(i)
    return rows, todo


def _square_batches(paths, todo, image_size, batch_size, flip):
    """Batches of (index, image [S, S, 3] resized as in training (mirrored with `flip`), ok,
    error) of paths[todo]; an unreadable file gives a zero image and ok=False."""
    dataset = image_io.load_images([paths[i] for i in todo], indices=todo)

    def prepare(element):
        image = tf.cond(
            element["ok"],
            lambda: resize_image(element["image"], image_size),
            lambda: tf.zeros([image_size, image_size, 3], tf.float32),
        )
        if flip:
            image = tf.reverse(image, axis=[1])
        return element["index"], image, element["ok"], element["error"]

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def extract_features(
    feature_fn, paths, image_size, batch_size=32, flip=False, cache=None, log_every_s=10.0
):
    """Pooled features of image files, computing only those missing from `cache`.

    Args:
      feature_fn: images [B, S, S, 3] in [0, 255] -> features [B, D].
      paths: image files.
      image_size: side S the images are resized to (squashed, as in training).
      batch_size: images per forward pass.
      flip: mirror the images horizontally first (for flip bagging).
      cache: a `BottleneckCache` for this extractor, or None.
      log_every_s: seconds between progress lines.

    Returns:
      (features float32 [n, D] with zero rows for unreadable images, ok bool [n],
       errors [(index, path, reason)]).
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    hashes = [file_sha256(p) for p in paths] if cache is not None else [None] * n
    rows, todo = _cached_rows(cache, hashes)
    if cache is not None:
        logging.info("features: %d of %d images cached in %s", n - len(todo), n, cache.path)
    errors = []
    if todo:
        dataset = _square_batches(paths, todo, image_size, batch_size, flip)
        compute = tf.function(feature_fn, reduce_retracing=True)
        start, last_log, done = time.time(), time.time(), 0
        new_hashes, new_features = [], []
        for index, images, ok, error in dataset:
            features = compute(images).numpy()
            for j, i in enumerate(index.numpy()):
                if bool(ok[j]):
                    rows[int(i)] = features[j]
                    if cache is not None and hashes[i] is not None:
                        new_hashes.append(hashes[i])
                        new_features.append(features[j])
                else:
                    reason = error[j].numpy().decode("utf-8")
                    errors.append((int(i), paths[i], reason))
                    logging.warning("Skipping unreadable image %s: %s", paths[i], reason)
            done += len(index)
            if time.time() - last_log > log_every_s:
                _progress(done, len(todo), start)
                last_log = time.time()
            if cache is not None and len(new_hashes) >= 4096:
                cache.add(new_hashes, np.stack(new_features))
                new_hashes, new_features = [], []
        if cache is not None and new_hashes:
            cache.add(new_hashes, np.stack(new_features))
        _progress(done, len(todo), start)
    dim = next(iter(rows.values())).shape[-1] if rows else 0
    features = np.zeros((n, dim), np.float32)
    ok = np.zeros(n, bool)
    for i, row in rows.items():
        features[i] = row
        ok[i] = True
    return features, ok, sorted(errors)
