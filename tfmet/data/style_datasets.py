"""Style datasets (Pandora18k, WikiPaintings/RASTA, folders, CSV) read into `StyleRecords`.

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
on the same data uses the same images (`tfmet.data.style_splits`); the images become tensors in
`tfmet.data.style_images`. This module needs no TensorFlow.
"""

import csv
import dataclasses
import os
import posixpath
import re

import numpy as np

from tfmet.data.met import check_relative_path
from tfmet.io.paths import RootResolver

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
MISSING = -1


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
