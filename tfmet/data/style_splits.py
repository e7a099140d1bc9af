"""Train/val/test splits of a style dataset: per-class stratified, seeded, kept in a JSON file.

`stratified_split` cuts every class by the same fractions with a generator seeded by (seed,
class); `write_split` / `read_split` store a split as relative image paths (format
"tfmet-style-split"), so every run on the same data uses the same images; `load_or_create_split`
reuses the file, or the dataset's own split (`StyleRecords.splits`), or makes a stratified one.
"""

import os

import numpy as np
from absl import logging

from tfmet.data.style_datasets import SPLITS
from tfmet.io.atomic import save_json
from tfmet.io.json_files import read_json

SPLIT_FORMAT = "tfmet-style-split"


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
