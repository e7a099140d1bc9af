"""Style images as tensors: the square resize, a one-pass check, a batched tf.data pipeline and
keras-cv augmentation of batches in [0, 255].

Images are read with `tfmet.data.images` (unreadable files are reported by `scan_images`, and
dropped by `image_dataset`) and resized to `image_size` x `image_size`, aspect not kept (RASTA).
"""

import time

import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.data import images as image_io

AUGMENTATIONS = ("none", "flip", "flip_crop", "randaugment")


def resize_image(image, image_size):
    """Bilinear (antialiased) resize to `image_size` x `image_size`, aspect not kept (RASTA)."""
    return tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)


def scan_images(paths, log_every_s=30.0):
    """Decodes every file once; returns [(index, path, reason)] for those that fail."""
    bad = []
    start = last = time.time()
    for done, element in enumerate(image_io.load_images(paths).prefetch(tf.data.AUTOTUNE), 1):
        if not bool(element["ok"]):
            i = int(element["index"])
            bad.append((i, paths[i], element["error"].numpy().decode("utf-8")))
        if time.time() - last > log_every_s:
            last = time.time()
            rate = done / (last - start)
            logging.info(
                "checking images: %d/%d, %.1f images/s, ETA %.0f s",
                done,
                len(paths),
                rate,
                (len(paths) - done) / rate,
            )
    for _, path, reason in bad:
        logging.warning("Skipping unreadable image %s: %s", path, reason)
    return bad


def image_dataset(
    paths, labels, image_size, batch_size, shuffle=False, seed=0, augment=None, repeat=False
):
    """A batched tf.data pipeline of (images [B, S, S, 3] float 0..255, {attribute: labels}).

    Unreadable files are dropped (run `scan_images` first to report them).

    Args:
      paths: absolute image paths.
      labels: attribute -> int array [n].
      image_size: output side S.
      batch_size: batch size.
      shuffle: shuffle the file order each epoch (seeded).
      seed: shuffle seed.
      augment: None, or a callable (images batch, training) -> images applied after batching.
      repeat: repeat forever.
    """
    paths = [str(p) for p in paths]
    labels = {a: np.asarray(v, np.int32) for a, v in labels.items()}
    order = tf.data.Dataset.range(len(paths))
    if shuffle:
        order = order.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        order = order.repeat()
    path_table = tf.constant(paths if paths else [""], tf.string)
    label_tables = {a: tf.constant(v if len(v) else [0], tf.int32) for a, v in labels.items()}

    def load(index):
        image, ok, _ = image_io.load_image(tf.gather(path_table, index))
        image = tf.cond(
            ok,
            lambda: resize_image(image, image_size),
            lambda: tf.zeros([image_size, image_size, 3], tf.float32),
        )
        image.set_shape([image_size, image_size, 3])
        return image, {a: tf.gather(t, index) for a, t in label_tables.items()}, ok

    dataset = order.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.filter(lambda image, target, ok: ok).map(lambda i, t, ok: (i, t))
    dataset = dataset.batch(batch_size)
    if augment is not None:
        dataset = dataset.map(lambda i, t: (augment(i), t), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_augmenter(kind, image_size, seed=0):
    """keras-cv augmentation of batches in [0, 255]: flips, flips + random crops, RandAugment."""
    if kind == "none":
        return None
    import keras_cv

    layers = [keras_cv.layers.RandomFlip("horizontal", seed=seed)]
    if kind in ("flip_crop", "randaugment"):
        layers.append(
            keras_cv.layers.RandomCropAndResize(
                target_size=(image_size, image_size),
                crop_area_factor=(0.6, 1.0),
                aspect_ratio_factor=(3 / 4, 4 / 3),
                seed=seed,
            )
        )
    if kind == "randaugment":
        layers.append(
            keras_cv.layers.RandAugment(
                value_range=(0, 255), augmentations_per_image=2, magnitude=0.3, seed=seed
            )
        )

    def augment(images):
        for layer in layers:
            images = layer(images, training=True)
        return images

    return augment
