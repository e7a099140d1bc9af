"""Descriptor stores: one float32 `.npy` (memory-mappable, rows in JSON order) + a JSON manifest.

Layout of a store directory, per split (`train`, `val`, `test`):

    <dir>/<split>_descriptors.npy   float32 [count, dim]
    <dir>/<split>_manifest.json     {"format": "tfmet-descriptors", "format_version": 1,
                                     "split", "count", "dim", "valid": [bool] * count,
                                     "errors": [{"index", "path", "reason"}], ...metadata}

Metadata written by extraction (tfmet.descriptors.extraction): backbone, weights_sha256, scales,
resize_method, max_side, source, paths, labels. Rows whose image could not be read are zeros with
valid=False and an entry in "errors". Both files are written atomically (temporary file +
rename), the manifest last, so a manifest always describes a complete array.
"""

import dataclasses
import json
import os

import numpy as np

import tfmet
from tfmet.io.atomic import atomic_path, save_json, save_npy

FORMAT = "tfmet-descriptors"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def array_path(directory, split):
    return os.path.join(os.fspath(directory), f"{split}_descriptors.npy")


def manifest_path(directory, split):
    return os.path.join(os.fspath(directory), f"{split}_manifest.json")


@dataclasses.dataclass
class DescriptorStore:
    """A split's descriptors [count, dim], per-row validity and the manifest."""

    descriptors: np.ndarray
    valid: np.ndarray
    manifest: dict

    @property
    def count(self):
        return int(self.descriptors.shape[0])

    @property
    def dim(self):
        return int(self.descriptors.shape[1])


def has_store(directory, split):
    return os.path.exists(manifest_path(directory, split))


def write_store(directory, split, descriptors, valid=None, errors=(), **metadata):
    """Writes a split's store atomically and returns its manifest."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2:
        raise ValueError(
            f"descriptors must be 2-D [count, dim]. Received: shape={descriptors.shape}"
        )
    count = descriptors.shape[0]
    valid = np.ones(count, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != (count,):
        raise ValueError(f"valid must have shape [{count}]. Received: shape={valid.shape}")
    manifest = _manifest(split, count, descriptors.shape[1], valid, errors, metadata)
    save_npy(array_path(directory, split), descriptors)
    save_json(manifest_path(directory, split), manifest)
    return manifest


def _manifest(split, count, dim, valid, errors, metadata):
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "split": split,
        "count": int(count),
        "dim": int(dim),
        "tfmet_version": tfmet.__version__,
        **metadata,
        "valid": np.asarray(valid, bool).tolist(),
        "errors": [dict(e) for e in errors],
    }


def write_store_rows(directory, split, count, dim, blocks, valid, errors=(), **metadata):
    """Writes a split's store from row blocks without holding the whole array in memory.

    Args:
      directory: store directory.
      split: split name.
      count, dim: shape of the array.
      blocks: iterable of (start_row, float32 array [n, dim]) covering rows 0..count-1 exactly.
      valid: bool [count].
      errors, metadata: as in `write_store`.

    The array is filled through a memory map of a temporary file that is renamed into place,
    then the manifest is written, both atomically.
    """
    valid = np.asarray(valid, bool)
    if valid.shape != (count,):
        raise ValueError(f"valid must have shape [{count}]. Received: shape={valid.shape}")
    covered = np.zeros(count, bool)
    with atomic_path(array_path(directory, split)) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        for start, rows in blocks:
            rows = np.asarray(rows, np.float32)
            stop = start + rows.shape[0]
            if rows.ndim != 2 or rows.shape[1] != dim or start < 0 or stop > count:
                raise ValueError(
                    f"block at row {start} has shape {rows.shape}; expected [n, {dim}] within "
                    f"{count} rows"
                )
            array[start:stop] = rows
            covered[start:stop] = True
        if not covered.all():
            raise ValueError(f"rows {np.flatnonzero(~covered)[:5].tolist()}... were not written")
        array.flush()
        del array
    manifest = _manifest(split, count, dim, valid, errors, metadata)
    save_json(manifest_path(directory, split), manifest)
    return manifest


def read_manifest(directory, split):
    """A split's manifest (dict) without opening the array; raises like `read_store`."""
    mpath = manifest_path(directory, split)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{mpath}: no descriptor store for split {split!r}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a tfmet descriptor manifest")
    return manifest


def read_store(directory, split, mmap=True):
    """Reads a split's store; `mmap` memory-maps the array instead of loading it.

    Raises:
      FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    mpath = manifest_path(directory, split)
    apath = array_path(directory, split)
    manifest = read_manifest(directory, split)
    try:
        descriptors = np.load(apath, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{apath}: descriptor array missing next to {mpath}") from None
    except ValueError as e:
        raise ValueError(f"{apath}: not a readable .npy array ({e})") from None
    expected = (manifest.get("count"), manifest.get("dim"))
    if descriptors.ndim != 2 or descriptors.shape != expected or descriptors.dtype != np.float32:
        raise ValueError(
            f"{apath}: array is {descriptors.dtype} {descriptors.shape}, manifest says float32 "
            f"{expected}"
        )
    valid = np.asarray(manifest.get("valid", [True] * descriptors.shape[0]), bool)
    if valid.shape != (descriptors.shape[0],):
        raise ValueError(f"{mpath}: 'valid' has {valid.size} entries for {expected[0]} rows")
    return DescriptorStore(descriptors, valid, manifest)
