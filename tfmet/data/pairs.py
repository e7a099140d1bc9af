"""tf.data pipeline of augmented image pairs for contrastive training.

`pair_dataset` turns an epoch's `tfmet.training.contrastive.mining.Pairs` (already in their
epoch order) into batches of

    {"first": float32 [B, S, S, 3], "second": float32 [B, S, S, 3],   # RGB in [0, 255]
     "label": int32 [B], "kind": int8 [B], "position": int64 [B]}

Each image is read, decoded at its native size and augmented independently (a synthetic pair is
one image under two augmentations). Randomness is stateless: pair `position` of `epoch` uses the
seed fold_in(fold_in([seed, epoch], position), side), so the parallel map is deterministic and
`start` (the number of pairs already consumed, for a resumed run) yields exactly the batches an
uninterrupted run would have seen from that point on.
"""

import tensorflow as tf

from tfmet.data.images import ImageRefused, decode_image, read_image_bytes


def pair_seeds(seed, epoch, position):
    """The [2, 2] stateless seeds of the two images of pair `position` of `epoch`."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))
    return tf.stack(
        [
            tf.random.experimental.stateless_fold_in(key, 0),
            tf.random.experimental.stateless_fold_in(key, 1),
        ]
    )


def _file_bytes(path):
    path = path.numpy().decode("utf-8")
    try:
        return read_image_bytes(path)
    except ImageRefused as e:  # a FIFO, a device, a file over the byte limit: name it
        raise ImageRefused(f"{path}: {e.message}") from None


def read_image(path):
    """Reads and decodes one image file (graph op): float32 [H, W, 3] in [0, 255].

    Only regular files within the byte limit are read (a FIFO named like a photo would block
    training forever), and the declared pixel count is checked before decoding.
    """
    data = tf.py_function(_file_bytes, [path], tf.string)
    data.set_shape([])
    return decode_image(data)


def pair_dataset(
    image_paths,
    pairs,
    augmenter,
    batch_size,
    seed,
    epoch,
    start=0,
    num_parallel_calls=tf.data.AUTOTUNE,
    prefetch=2,
):
    """Batches of augmented pairs, in the order of `pairs`, from pair `start` on.

    Args:
      image_paths: full paths of the database images (row i of `pairs` refers to path i).
      pairs: the epoch's `Pairs`, in the order to train on (shuffled by the caller).
      augmenter: callable (image [H, W, 3], seed [2]) -> [S, S, 3], e.g. `Augmenter`.
      batch_size: pairs per batch; the last batch may be smaller.
      seed: the run's integer seed.
      epoch: the epoch number (enters the augmentation seeds).
      start: pairs to skip (already trained on before a resume).
      num_parallel_calls: parallel reads/augmentations (the output order never changes).
      prefetch: batches prepared ahead.

    Returns:
      a `tf.data.Dataset` of dicts (see the module docstring).
    """
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be positive. Received: batch_size={batch_size}")
    if not 0 <= int(start) <= len(pairs):
        raise ValueError(f"`start` must be in [0, {len(pairs)}]. Received: start={start}")
    paths = tf.constant([str(p) for p in image_paths], tf.string, shape=[len(image_paths)])
    positions = tf.range(len(pairs), dtype=tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(
        {
            "first": tf.constant(pairs.first, tf.int64, shape=[len(pairs)]),
            "second": tf.constant(pairs.second, tf.int64, shape=[len(pairs)]),
            "label": tf.constant(pairs.label, tf.int32, shape=[len(pairs)]),
            "kind": tf.constant(pairs.kind, tf.int8, shape=[len(pairs)]),
            "position": positions,
        }
    ).skip(int(start))

    def load(element):
        seeds = pair_seeds(seed, epoch, element["position"])
        first = augmenter(read_image(tf.gather(paths, element["first"])), seeds[0])
        second = augmenter(read_image(tf.gather(paths, element["second"])), seeds[1])
        return {
            "first": first,
            "second": second,
            "label": element["label"],
            "kind": element["kind"],
            "position": element["position"],
        }

    dataset = dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    return dataset.batch(int(batch_size)).prefetch(prefetch)


def num_batches(num_pairs, batch_size):
    """Batches in an epoch of `num_pairs` pairs (the last one may be partial)."""
    return -(-int(num_pairs) // int(batch_size))
