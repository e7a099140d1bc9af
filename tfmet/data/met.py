"""The Met ground truth: database and query lists, validated, with image paths resolved safely.

Files in an `info_dir` (see docs/extraction.md):

    MET_database.json / mini_MET_database.json   [{"id": <int>, "path": "MET/<id>/<n>.jpg"}, ...]
    valset.json / testset.json                   [{"path": "test_met/...", "MET_id": <int>}, ...]

Query entries without `MET_id` are distractors (other art, non-art) and get label -1. Images live
under `<image_root>/images/<path>`.
"""

import dataclasses
import os
import posixpath

import numpy as np

from tfmet.io.json_files import read_json

SPLITS = ("train", "val", "test")
DISTRACTOR = -1

DATABASE_FILE = "MET_database.json"
MINI_DATABASE_FILE = "mini_MET_database.json"
QUERY_FILES = {"val": "valset.json", "test": "testset.json"}


@dataclasses.dataclass(frozen=True)
class MetSplit:
    """One split of the Met ground truth, in JSON order.

    Attributes:
      split: "train", "val" or "test".
      paths: image paths relative to `<image_root>/images`.
      labels: int64 [n]; the Met object id (`id` for the database, `MET_id` for queries), -1 for
        distractor queries.
      source: the JSON file read.
    """

    split: str
    paths: list[str]
    labels: np.ndarray
    source: str

    def __len__(self):
        return len(self.paths)

    @property
    def is_distractor(self):
        """bool [n]: queries without a Met label."""
        return self.labels == DISTRACTOR


def split_file(info_dir, split, mini=False):
    """The JSON file holding `split` ("train" reads the (mini) database)."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    if split == "train":
        name = MINI_DATABASE_FILE if mini else DATABASE_FILE
    else:
        name = QUERY_FILES[split]
    return os.path.join(os.fspath(info_dir), name)


def check_relative_path(path, source="<paths>", index=None):
    """Raises ValueError unless `path` is a relative path that stays below its root."""
    where = source if index is None else f"{source}: entry {index}"
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: 'path' must be a non-empty string. Received: {path!r}")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"{where}: 'path' {path!r} contains a NUL byte or a backslash")
    if path.startswith("/") or posixpath.isabs(path) or os.path.isabs(path):
        raise ValueError(f"{where}: 'path' {path!r} is absolute; it must be relative to the root")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise ValueError(f"{where}: 'path' {path!r} escapes the image root")


def resolve_image_path(image_root, path):
    """`<image_root>/images/<path>`, refusing paths that would leave `<image_root>/images`."""
    check_relative_path(path)
    base = os.path.join(os.fspath(image_root), "images")
    full = os.path.normpath(os.path.join(base, *path.split("/")))
    if os.path.commonpath([os.path.abspath(base), os.path.abspath(full)]) != os.path.abspath(base):
        raise ValueError(f"path {path!r} escapes the image root {base}")
    return full


def image_paths(split, image_root):
    """Full paths of a `MetSplit`'s images under `image_root`."""
    return [resolve_image_path(image_root, p) for p in split.paths]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json_list(path):
    entries = read_json(path, "Met ground-truth file")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found {type(entries).__name__}")
    return entries


def parse_entries(entries, split, source="<entries>"):
    """Validates decoded JSON `entries` of `split`; returns (paths, labels).

    Raises:
      ValueError naming `source`, the entry index and the problem: an entry that is not an
      object, a missing or non-integer label, a bad or escaping path, a duplicate path.
    """
    label_key = "id" if split == "train" else "MET_id"
    paths, labels, first_index = [], [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} must be an object, found {type(entry).__name__}")
        if "path" not in entry:
            raise ValueError(f"{source}: entry {i} has no 'path' key")
        path = entry["path"]
        check_relative_path(path, source, i)
        if label_key in entry:
            label = entry[label_key]
            if not _is_int(label) or not 0 <= label < 2**63:
                raise ValueError(
                    f"{source}: entry {i} has '{label_key}' {label!r}; expected a non-negative "
                    "integer"
                )
        elif split == "train":
            raise ValueError(f"{source}: entry {i} has no '{label_key}' key")
        else:
            label = DISTRACTOR
        if path in first_index:
            raise ValueError(
                f"{source}: entry {i} repeats path {path!r} of entry {first_index[path]}"
            )
        first_index[path] = i
        paths.append(path)
        labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64).reshape(-1)


def load_split(info_dir, split, mini=False):
    """Reads and validates one split of the Met ground truth.

    Args:
      info_dir: folder holding the JSON files.
      split: "train" (the database; `mini` selects mini_MET_database.json), "val" or "test".
      mini: read the mini database for "train"; the query splits are the same either way.

    Returns:
      a `MetSplit`.

    Raises:
      FileNotFoundError: the JSON file is missing.
      ValueError: the file is invalid; the message names the file, the entry index and the problem.
    """
    source = split_file(info_dir, split, mini)
    paths, labels = parse_entries(_read_json_list(source), split, source)
    return MetSplit(split=split, paths=paths, labels=labels, source=source)
