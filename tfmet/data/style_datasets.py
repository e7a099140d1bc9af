"""Style datasets (Pandora18k, WikiPaintings/RASTA, folders, CSV), stratified splits, tf.data.

Every loader returns a `StyleRecords`: image paths relative to a root, one integer label array per
attribute ("style", "artist", "genre", ...; -1 = not annotated) with its sorted class names, and,
when the dataset ships its own split (WikiPaintings list files), that split.

Layouts:

- Pandora18k: `<root>/<movement>/<artist>/<image>`. Movements are the "style" attribute, artists
  the "artist" attribute (images lying directly in a movement folder have no artist, -1). Paths
  stay relative to the root, so equal file names of different artists never collide.
- WikiPaintings list files (RASTA / ArtGAN): `train.txt`, `val.txt`, `test.txt` (or `.csv`) with
  one `relative/path label` line per image (whitespace or comma before the label; the path may
  contain spaces). Labels are class names or integer indices into an optional classes file of
  `index name` lines.
- Folders: `<root>/<style>/<image>`; or, when `<root>` holds `train`/`val`/`test` folders (or
  RASTA's `*_train`/`*_val`/`*_test`), one such tree per split.
- CSV: a header row with a path column and one column per attribute; empty cells are -1.

Every image must stay below the root, also after following symbolic links: an absolute path, a
".." that climbs out, or a link (to a file or a folder) that lands outside the root's real path is
refused with a ValueError naming the entry and the file (list file and line, CSV row, or the
root folder) it came from. List and CSV paths are normalised (`a/./b`, `a//b` and `x/../a/b` are
`a/b`), and naming one image twice is refused.

Splits are per-class stratified, seeded and written to a JSON file of relative paths, so every run
on the same data uses the same images (`load_or_create_split`).
"""

import csv
import dataclasses
import os
import posixpath
import re
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.data import images as image_io
from tfmet.data.met import check_relative_path
from tfmet.io.atomic import save_json
from tfmet.io.json_files import read_json
from tfmet.io.paths import RootResolver

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
MISSING = -1
SPLIT_FORMAT = "tfmet-style-split"
AUGMENTATIONS = ("none", "flip", "flip_crop", "randaugment")


@dataclasses.dataclass
class StyleRecords:
    """Images of a style dataset and their labels.

    Attributes:
      root: directory the paths are relative to.
      paths: relative image paths ("/"-separated), one per image.
      labels: attribute -> int32 [n] class indices into `class_names[attribute]`; -1 = missing.
      class_names: attribute -> sorted class names.
      splits: split name -> int64 indices of the dataset's own split, or None.
    """

    root: str
    paths: list[str]
    labels: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    splits: dict[str, np.ndarray] | None = None

    def __post_init__(self):
        n = len(self.paths)
        for attribute, values in self.labels.items():
            if len(values) != n:
                raise ValueError(f"attribute {attribute!r} has {len(values)} labels for {n} paths")
            if attribute not in self.class_names:
                raise ValueError(f"attribute {attribute!r} has no class names")

    def __len__(self):
        return len(self.paths)

    @property
    def attributes(self):
        return list(self.labels)

    def abspath(self, index):
        return os.path.join(self.root, self.paths[index])

    def abspaths(self, indices=None):
        indices = range(len(self.paths)) if indices is None else indices
        return [self.abspath(int(i)) for i in indices]

    def subset(self, indices):
        """The records at `indices` (same class names, no split)."""
        indices = np.asarray(indices, dtype=np.int64)
        return StyleRecords(
            root=self.root,
            paths=[self.paths[i] for i in indices],
            labels={a: v[indices] for a, v in self.labels.items()},
            class_names=dict(self.class_names),
        )

    def select_attributes(self, attributes):
        """The same images keeping only `attributes`; an unknown one raises ValueError."""
        unknown = [a for a in attributes if a not in self.labels]
        if unknown:
            raise ValueError(
                f"Unknown attribute(s) {unknown} for the dataset at {self.root}. "
                f"Available: {self.attributes}"
            )
        return dataclasses.replace(
            self,
            labels={a: self.labels[a] for a in attributes},
            class_names={a: self.class_names[a] for a in attributes},
        )


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _sorted_dirs(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _sorted_images(path):
    return sorted(e.name for e in os.scandir(path) if e.is_file() and _is_image(e.name))


def _require_dir(root, what):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what}: {root} is not a directory")


def _encode(values, class_names=None):
    """String labels ("" = missing) -> (int32 indices, sorted class names)."""
    if class_names is None:
        class_names = sorted({v for v in values if v != ""})
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.array([lookup[v] if v != "" else MISSING for v in values], np.int32), class_names


def _records(root, paths, columns, splits=None, class_names=None):
    labels, names = {}, {}
    for attribute, values in columns.items():
        given = None if class_names is None else class_names.get(attribute)
        labels[attribute], names[attribute] = _encode(values, given)
    return StyleRecords(os.path.abspath(root), paths, labels, names, splits)


def _confine(root, entries):
    """Normalised paths of `entries` ((relative path, where) pairs), each checked to stay below
    `root` lexically and after following links, and named once; else ValueError naming `where`."""
    resolver = RootResolver(root, "the image root")
    paths, first = [], {}
    for path, where in entries:
        check_relative_path(path, where)
        normal = posixpath.normpath(path)
        resolver.check(os.path.join(root, *normal.split("/")), path, where)
        if normal in first:
            raise ValueError(f"{where}: {path!r} names the same image as {first[normal]}")
        first[normal] = f"{path!r} ({where})"
        paths.append(normal)
    return paths


def _confine_tree(root, paths, what):
    return _confine(root, [(p, f"{what} {root}") for p in paths])


def load_pandora18k(root):
    """Pandora18k: `<root>/<movement>/<artist>/<image>` -> attributes "style" and "artist"."""
    _require_dir(root, "Pandora18k root")
    paths, styles, artists = [], [], []
    for movement in _sorted_dirs(root):
        movement_dir = os.path.join(root, movement)
        for name in _sorted_images(movement_dir):
            paths.append(f"{movement}/{name}")
            styles.append(movement)
            artists.append("")
        for artist in _sorted_dirs(movement_dir):
            for path in _images_below(root, os.path.join(movement_dir, artist)):
                paths.append(path)
                styles.append(movement)
                artists.append(artist)
    if not paths:
        raise ValueError(f"Pandora18k root {root}: no images found in <movement>/<artist>/ folders")
    paths = _confine_tree(root, paths, "Pandora18k root")
    return _records(root, paths, {"style": styles, "artist": artists})


def _images_below(root, directory):
    """'/'-separated paths, relative to `root`, of the images in `directory`'s tree, sorted."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in sorted(filter(_is_image, filenames)):
            yield f"{rel}/{name}"


def _folder_tree(root, base):
    paths, styles = [], []
    for style in _sorted_dirs(base):
        for path in _images_below(root, os.path.join(base, style)):
            paths.append(path)
            styles.append(style)
    return paths, styles


def _split_dirs(root):
    """{"train": dir, ...} when `root` holds split folders (train/ or wikipaintings_train/)."""
    found = {}
    for name in _sorted_dirs(root):
        match = re.fullmatch(r"(?:.*_)?(train|val|test)", name)
        if match:
            if match.group(1) in found:
                raise ValueError(
                    f"{root}: two folders for split {match.group(1)!r}: "
                    f"{os.path.basename(found[match.group(1)])} and {name}"
                )
            found[match.group(1)] = os.path.join(root, name)
    return found if "train" in found else {}


def load_folders(root):
    """`<root>/<style>/<image>` (or per-split trees `<root>/<..._train>/<style>/<image>`)."""
    _require_dir(root, "style folder root")
    split_dirs = _split_dirs(root)
    if not split_dirs:
        paths, styles = _folder_tree(root, root)
        if not paths:
            raise ValueError(f"style folder root {root}: no images found in <style>/ folders")
        return _records(root, _confine_tree(root, paths, "style folder root"), {"style": styles})
    paths, styles, splits = [], [], {}
    for split in SPLITS:
        if split in split_dirs:
            p, s = _folder_tree(root, split_dirs[split])
            splits[split] = np.arange(len(paths), len(paths) + len(p), dtype=np.int64)
            paths += p
            styles += s
    paths = _confine_tree(root, paths, "style folder root")
    return _records(root, paths, {"style": styles}, splits=splits)


def read_classes_file(path):
    """`index name` lines (or one name per line) -> list of names in index order."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].isdigit():
                index, name = int(parts[0]), parts[1].strip()
            else:
                index, name = len(names), line
            if index in names:
                raise ValueError(f"{path}:{number}: class index {index} appears twice")
            names[index] = name
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: class indices must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]


def _list_lines(path):
    """(line number, image path, label) of each `relative/path label` line of a list file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "," in line:
                image, _, label = line.rpartition(",")
            else:
                parts = line.rsplit(None, 1)
                image, label = (parts[0], parts[1]) if len(parts) == 2 else ("", "")
            image, label = image.strip(), label.strip()
            if not image or not label:
                raise ValueError(f"{path}:{number}: expected 'path label', found {line!r}")
            yield number, image.replace("\\", "/"), label


def _find_list_file(list_dir, split):
    for candidate in (f"{split}.txt", f"{split}.csv", f"{split}.lst"):
        path = os.path.join(list_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_wikipaintings_lists(root, list_dir=None, classes_file=None):
    """WikiPaintings/RASTA list files `{train,val,test}.txt` of `path label` lines.

    Args:
      root: the directory image paths are relative to.
      list_dir: where the list files are (default `root`).
      classes_file: `index name` lines mapping integer labels to names; default
        `<list_dir>/classes.txt` when it exists. Without one, labels are names themselves.

    Returns:
      StyleRecords with the "style" attribute and the lists' split.
    """
    _require_dir(root, "WikiPaintings image root")
    list_dir = root if list_dir is None else list_dir
    if classes_file is None and os.path.isfile(os.path.join(list_dir, "classes.txt")):
        classes_file = os.path.join(list_dir, "classes.txt")
    index_names = read_classes_file(classes_file) if classes_file else None
    entries, styles, splits = [], [], {}
    for split in SPLITS:
        list_path = _find_list_file(list_dir, split)
        if list_path is None:
            if split == "train":
                raise FileNotFoundError(f"WikiPaintings lists: no train.txt/.csv in {list_dir}")
            continue
        lines = list(_list_lines(list_path))
        split_paths = [(image, f"{list_path}:{number}") for number, image, _ in lines]
        split_labels = [label for _, _, label in lines]
        if index_names is not None:
            names = []
            for label in split_labels:
                if not label.isdigit() or int(label) >= len(index_names):
                    raise ValueError(
                        f"{list_path}: label {label!r} is not a class index of {classes_file} "
                        f"(0..{len(index_names) - 1})"
                    )
                names.append(index_names[int(label)])
            split_labels = names
        splits[split] = np.arange(len(entries), len(entries) + len(split_paths), dtype=np.int64)
        entries += split_paths
        styles += split_labels
    class_names = None if index_names is None else {"style": list(index_names)}
    paths = _confine(root, entries)
    return _records(root, paths, {"style": styles}, splits=splits, class_names=class_names)


def load_csv(csv_path, root=None, path_column="path", attributes=None):
    """A CSV with a header: the image path column and one column per attribute.

    Args:
      csv_path: the CSV file.
      root: directory the paths are relative to (default: the CSV's folder).
      path_column: the column holding image paths.
      attributes: the attribute columns to read (default: every other column).
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"style CSV {csv_path} does not exist")
    root = os.path.dirname(os.path.abspath(csv_path)) if root is None else root
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if path_column not in header:
            raise ValueError(f"{csv_path}: no {path_column!r} column (columns: {header})")
        attributes = [c for c in header if c != path_column] if attributes is None else attributes
        missing = [a for a in attributes if a not in header]
        if missing:
            raise ValueError(f"{csv_path}: no column(s) {missing} (columns: {header})")
        if not attributes:
            raise ValueError(f"{csv_path}: no attribute columns besides {path_column!r}")
        rows = list(reader)
    paths = [row[path_column].strip().replace("\\", "/") for row in rows]
    for number, path in enumerate(paths, 2):
        if not path:
            raise ValueError(f"{csv_path}:{number}: empty {path_column!r}")
    entries = [(path, f"{csv_path}:{number}") for number, path in enumerate(paths, 2)]
    paths = _confine(root, entries)
    columns = {a: [(row[a] or "").strip() for row in rows] for a in attributes}
    return _records(root, paths, columns)


def load_dataset(format, root, list_dir=None, classes_file=None, csv_path=None, attributes=None):
    """Dispatches on `format`: "pandora18k", "wikipaintings", "folders" or "csv"."""
    if format == "pandora18k":
        records = load_pandora18k(root)
    elif format == "wikipaintings":
        records = load_wikipaintings_lists(root, list_dir or None, classes_file or None)
    elif format == "folders":
        records = load_folders(root)
    elif format == "csv":
        records = load_csv(csv_path or os.path.join(root, "labels.csv"), root or None)
    else:
        raise ValueError(
            "Unknown dataset format. Expected one of pandora18k, wikipaintings, folders, csv. "
            f"Received: format={format!r}"
        )
    return records.select_attributes(attributes) if attributes else records


# --- Splits ---------------------------------------------------------------------------------


def stratified_split(labels, fractions=(0.8, 0.1, 0.1), seed=0):
    """Deterministic per-class split of indices 0..n-1 into train/val/test.

    Within each class (label value; -1 is a class of its own) the indices are shuffled with a
    generator seeded by (`seed`, class), and cut by largest-remainder rounding of the fractions,
    so each split gets its share of every class. The result depends only on `labels`, `fractions`
    and `seed`.

    Returns:
      {"train": int64 [n_train], "val": ..., "test": ...}, each sorted.
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(
            f"`fractions` must be three non-negative numbers summing to 1 (train, val, test). "
            f"Received: fractions={tuple(fractions.tolist())}"
        )
    labels = np.asarray(labels).reshape(-1)
    out = {split: [] for split in SPLITS}
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng = np.random.default_rng([int(seed), int(value) + 1])
        members = members[rng.permutation(len(members))]
        exact = fractions * len(members)
        counts = np.floor(exact).astype(int)
        remainder = len(members) - counts.sum()
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
        bounds = np.cumsum(counts)[:-1]
        for split, part in zip(SPLITS, np.split(members, bounds), strict=True):
            out[split].append(part)
    return {s: np.sort(np.concatenate(out[s])).astype(np.int64) for s in SPLITS}


def write_split(path, records, split_indices, **metadata):
    """Writes a split as relative paths per split name (JSON, atomically)."""
    save_json(
        path,
        {
            "format": SPLIT_FORMAT,
            "format_version": 1,
            **metadata,
            "counts": {s: len(v) for s, v in split_indices.items()},
            "splits": {s: [records.paths[int(i)] for i in v] for s, v in split_indices.items()},
        },
    )


def read_split(path, records):
    """Reads a split file and maps its paths to indices of `records`.

    Raises:
      ValueError: the file is not a split file, or lists images `records` does not have (the
        dataset changed since the split was written).
    """
    data = read_json(path, "split file")
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path}: not a {SPLIT_FORMAT} file")
    index = {p: i for i, p in enumerate(records.paths)}
    out = {}
    for split, paths in data["splits"].items():
        missing = [p for p in paths if p not in index]
        if missing:
            raise ValueError(
                f"{path}: split {split!r} lists {len(missing)} image(s) absent from the dataset "
                f"at {records.root}, e.g. {missing[0]!r}; the dataset changed since the split "
                "was written (delete the file to make a new split)"
            )
        out[split] = np.array(sorted(index[p] for p in paths), np.int64)
    return out


def load_or_create_split(records, path, fractions=(0.8, 0.1, 0.1), seed=0, stratify="style"):
    """The split stored at `path`, or a new one written there.

    A dataset's own split (`records.splits`) is used as is; otherwise `stratified_split` on the
    `stratify` attribute. Either way the split is written to `path` so later runs reuse it.
    """
    if os.path.exists(path):
        logging.info("Using the split in %s", path)
        return read_split(path, records)
    if records.splits is not None:
        splits = {s: np.asarray(v, np.int64) for s, v in records.splits.items()}
        metadata = {"source": "dataset lists"}
    else:
        if stratify not in records.labels:
            raise ValueError(
                f"cannot stratify on {stratify!r}: the dataset has attributes {records.attributes}"
            )
        splits = stratified_split(records.labels[stratify], fractions, seed)
        metadata = {
            "source": "stratified",
            "stratify": stratify,
            "seed": int(seed),
            "fractions": [float(f) for f in fractions],
        }
    write_split(path, records, splits, **metadata)
    logging.info("Wrote split %s: %s", path, ", ".join(f"{s}={len(v)}" for s, v in splits.items()))
    return splits


# --- Images ---------------------------------------------------------------------------------


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
