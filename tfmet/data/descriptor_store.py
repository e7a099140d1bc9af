"""Descriptor stores: one float32 `.npy` (memory-mappable, rows in JSON order) + a JSON manifest.

Layout of a store directory, per split (`train`, `val`, `test`):

    <dir>/<split>_descriptors.npy   float32 [count, dim]
    <dir>/<split>_manifest.json     {"format": "tfmet-descriptors", "format_version": 1,
                                     "split", "count", "dim", "valid": [bool] * count,
                                     "errors": [{"index", "path", "reason"}], ...metadata}

With local features (`tfmet-extract --local_features N`, manifest entry "local_features":
{"num", "dim", "seed"}), four more arrays, written before the manifest:

    <dir>/<split>_local_descriptors.npy  float16 [count, num, dim]  L2-normalised rows
    <dir>/<split>_local_points.npy       float16 [count, num, 2]    (x, y), fractions of the
                                                                    image's long side
    <dir>/<split>_local_scores.npy       float32 [count, num]       keypoint scores, descending
    <dir>/<split>_local_counts.npy       int16 [count]              how many of `num` are real
                                                                    (the rest are zeros)

Metadata written by extraction (tfmet.descriptors.extraction): backbone, weights_sha256, scales,
resize_method, max_side, source, paths, labels. Rows whose image could not be read are zeros with
valid=False and an entry in "errors". Both files are written atomically (temporary file +
rename), the manifest last, so a manifest always describes a complete array.
"""

import contextlib
import dataclasses
import os

import numpy as np

import tfmet
from tfmet.data import met
from tfmet.io import json_files
from tfmet.io.arrays import load_npy
from tfmet.io.atomic import atomic_path, save_json, save_npy
from tfmet.io.hashing import file_sha256

FORMAT = "tfmet-descriptors"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def array_path(directory, split):
    return os.path.join(os.fspath(directory), f"{split}_descriptors.npy")


def manifest_path(directory, split):
    return os.path.join(os.fspath(directory), f"{split}_manifest.json")


LOCAL_ARRAYS = {  # name -> (dtype, trailing shape given (num, dim))
    "descriptors": (np.float16, lambda num, dim: (num, dim)),
    "points": (np.float16, lambda num, dim: (num, 2)),
    "scores": (np.float32, lambda num, dim: (num,)),
    "counts": (np.int16, lambda num, dim: ()),
}


def empty_local_rows(count, num, dim):
    """Zeroed local-feature arrays of `count` rows of `num` features of dimension `dim`,
    {name: array} laid out as `LOCAL_ARRAYS`."""
    return {
        name: np.zeros((count, *trailing(num, dim)), dtype)
        for name, (dtype, trailing) in LOCAL_ARRAYS.items()
    }


def set_local_row(local, i, points, descriptors, scores):
    """Row `i` of `empty_local_rows`' arrays: one image's local features (fewer than `num`
    when its feature map has fewer cells)."""
    n = len(scores)
    local["points"][i, :n] = points
    local["descriptors"][i, :n] = descriptors
    local["scores"][i, :n] = scores
    local["counts"][i] = n


def local_path(directory, split, name):
    return os.path.join(os.fspath(directory), f"{split}_local_{name}.npy")


@dataclasses.dataclass
class LocalStore:
    """A split's local features (see the module doc); arrays memory-mapped by `read_local`."""

    descriptors: np.ndarray
    points: np.ndarray
    scores: np.ndarray
    counts: np.ndarray
    spec: dict

    def image(self, row):
        """(points [n, 2] float32, descriptors [n, dim] float32, scores [n]) of one image."""
        n = int(self.counts[row])
        return (
            np.asarray(self.points[row, :n], np.float32),
            np.asarray(self.descriptors[row, :n], np.float32),
            np.asarray(self.scores[row, :n], np.float32),
        )


def _fill_rows(arrays, blocks, rows_of, what=""):
    """Fills memory-mapped `arrays` ({name: array [count, ...]}) from row blocks (start,
    {name: rows}) that cover rows 0..count-1; a block's rows are as many as its `rows_of` array's,
    and each of its arrays must hold exactly them. Then flushes the arrays.

    Raises:
      ValueError: a block whose array has another shape or that reaches outside the arrays
        (named: `what` + the array's name), or rows no block wrote.
    """
    count = len(next(iter(arrays.values())))
    covered = np.zeros(count, bool)
    for start, block in blocks:
        stop = start + len(block[rows_of])
        for name, array in arrays.items():
            rows = np.asarray(block[name], array.dtype)
            expected = (stop - start, *array.shape[1:])
            if rows.shape != expected or start < 0 or stop > count:
                raise ValueError(
                    f"{what}{name} block at row {start} has shape {rows.shape}; expected "
                    f"{list(expected)} within {count} rows"
                )
            array[start:stop] = rows
        covered[start:stop] = True
    if not covered.all():
        raise ValueError(f"{what}rows {np.flatnonzero(~covered)[:5].tolist()}... were not written")
    for array in arrays.values():
        array.flush()


def write_local_rows(directory, split, count, num, dim, blocks):
    """Writes a split's local arrays from row blocks (start, {name: array}), memory-mapped
    temporaries renamed into place; call before the manifest that names them."""
    with contextlib.ExitStack() as stack:
        arrays = {}
        for name, (dtype, trailing) in LOCAL_ARRAYS.items():
            tmp = stack.enter_context(atomic_path(local_path(directory, split, name)))
            shape = (count, *trailing(num, dim))
            arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        _fill_rows(arrays, blocks, "counts", "local ")
        arrays.clear()


def read_local(directory, split, mmap=True):
    """A split's `LocalStore`; errors name the file (no local features, wrong shapes)."""
    manifest = read_manifest(directory, split)
    spec = manifest.get("local_features")
    mpath = manifest_path(directory, split)
    if not spec:
        raise ValueError(
            f"{mpath}: the store has no local features (extract with --local_features N)"
        )
    count, num, dim = int(manifest["count"]), int(spec["num"]), int(spec["local_dim"])
    arrays = {}
    for name, (dtype, trailing) in LOCAL_ARRAYS.items():
        path = local_path(directory, split, name)
        try:
            array = load_npy(path, ".npy array", mmap=mmap)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: local features missing next to {mpath}") from None
        expected = (count, *trailing(num, dim))
        if array.shape != expected or array.dtype != dtype:
            raise ValueError(
                f"{path}: array is {array.dtype} {array.shape}, the manifest says "
                f"{np.dtype(dtype).name} {expected}"
            )
        arrays[name] = array
    if count and (arrays["counts"].min() < 0 or arrays["counts"].max() > num):
        raise ValueError(f"{local_path(directory, split, 'counts')}: counts outside [0, {num}]")
    return LocalStore(**arrays, spec=spec)


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
    with atomic_path(array_path(directory, split)) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        named = ((start, {"descriptors": rows}) for start, rows in blocks)
        _fill_rows({"descriptors": array}, named, "descriptors")
        del array  # closes the memory map before the rename
    manifest = _manifest(split, count, dim, valid, errors, metadata)
    save_json(manifest_path(directory, split), manifest)
    return manifest


def read_manifest(directory, split):
    """A split's manifest (dict) without opening the array; raises like `read_store`."""
    mpath = manifest_path(directory, split)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{mpath}: no descriptor store for split {split!r}")
    return json_files.read_manifest(mpath, FORMAT, "tfmet descriptor manifest")


def read_store(directory, split, mmap=True):
    """Reads a split's store; `mmap` memory-maps the array instead of loading it.

    Raises:
      FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    mpath = manifest_path(directory, split)
    apath = array_path(directory, split)
    manifest = read_manifest(directory, split)
    try:
        descriptors = load_npy(apath, ".npy array", mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"{apath}: descriptor array missing next to {mpath}") from None
    check_manifest(mpath, manifest)
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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(path, manifest):
    """Raises ValueError naming `path` and the field when a manifest field has the wrong type or
    length (a hand-edited manifest: `"valid": ["false", ...]` is not read as all-True)."""
    count = manifest.get("count")
    for key in ("count", "dim"):
        if not _is_int(manifest.get(key)) or manifest[key] < 0:
            raise ValueError(f"{path}: '{key}' must be a non-negative integer")
    per_row = {
        "valid": (lambda v: isinstance(v, bool), "true or false"),
        "paths": (lambda v: isinstance(v, str), "a string"),
        "labels": (_is_int, "an integer"),
    }
    for key, (ok, kind) in per_row.items():
        values = manifest.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != count:
            raise ValueError(f"{path}: '{key}' must be a list of {count} entries, one per row")
        bad = next((i for i, v in enumerate(values) if not ok(v)), None)
        if bad is not None:
            raise ValueError(f"{path}: '{key}' entry {bad} is {values[bad]!r}, not {kind}")
    errors = manifest.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors):
        raise ValueError(f"{path}: 'errors' must be a list of objects")
    scales = manifest.get("scales")
    if scales is not None and not (
        isinstance(scales, list) and all(isinstance(x, int | float) for x in scales)
    ):
        raise ValueError(f"{path}: 'scales' must be a list of numbers")
    for key in ("backbone", "weights_sha256", "resize_method", "source", "precision"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise ValueError(f"{path}: '{key}' must be a string")
    version = manifest.get("precision_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ValueError(f"{path}: 'precision_version' must be an integer")


# What makes descriptors of different splits comparable: one model, one way of extracting.
EXTRACTION_KEYS = (
    "backbone",
    "weights_sha256",
    "scales",
    "resize_method",
    "max_side",
    "precision",
    "precision_version",
)


def check_same_extraction(manifests):
    """Raises ValueError when stores of different splits were extracted differently.

    Args:
      manifests: {manifest path: manifest}. A key that a manifest lacks (e.g. an imported
        pickle's) is not compared, except `precision`: stores without it (written before it was
        recorded, or imported) hold float32 descriptors; and `precision_version`: stores
        without it hold version 1 (`tfmet.precision.PRECISION_VERSIONS`).
    """
    defaults = {"precision": "float32", "precision_version": 1}
    items = [(path, defaults | m) for path, m in manifests.items()]
    for key in EXTRACTION_KEYS:
        seen = [(path, m[key]) for path, m in items if m.get(key) is not None]
        for path, value in seen[1:]:
            if value != seen[0][1]:
                raise ValueError(
                    f"{path}: extracted with {key}={value!r} but {seen[0][0]} with "
                    f"{key}={seen[0][1]!r}; descriptors of different extractions cannot be "
                    "searched together (extract every split with the same model and settings)"
                )


def check_ground_truth(path, manifest, paths, labels, source):
    """Raises ValueError when a store's recorded rows are not the ground truth's, row by row.

    Args:
      path: the manifest's path (for the message).
      manifest: the store's manifest; its "paths" / "labels" (when recorded) are compared.
      paths: the ground truth's image paths (relative, in file order).
      labels: the ground truth's labels (int [n]).
      source: the ground-truth file (for the message).
    """
    if manifest.get("count") != len(paths):
        raise ValueError(
            f"{path}: {manifest.get('count')} rows but {source} lists {len(paths)} images"
        )
    recorded = manifest.get("paths")
    if recorded is not None:
        for i, (a, b) in enumerate(zip(recorded, paths, strict=True)):
            if os.path.normpath(a) != os.path.normpath(b):
                raise ValueError(
                    f"{path}: row {i} is {a!r} but {source} lists {b!r} there; the ground truth "
                    "changed after extraction (extract again)"
                )
    recorded = manifest.get("labels")
    if recorded is not None:
        differ = np.flatnonzero(np.asarray(recorded, np.int64) != np.asarray(labels, np.int64))
        if differ.size:
            i = int(differ[0])
            raise ValueError(
                f"{path}: row {i} has label {recorded[i]} but {source} says {int(labels[i])}; "
                f"{differ.size} rows differ (extract again)"
            )


# Keys of the Met reference's descriptors.pkl -> split.
REFERENCE_KEYS = {f"{split}_descriptors": split for split in SPLITS}


def import_reference_descriptors(
    pickle_path, output_dir, info_dir=None, mini=None, overwrite=False, **metadata
):
    """Converts the Met reference's `descriptors.pkl` to tfmet stores without running pickle code.

    Args:
      pickle_path: the reference file, a pickled dict with keys among `train_descriptors`,
        `val_descriptors`, `test_descriptors` (float32 [n, d], rows in JSON order). It is read
        with `tfmet.io.safe_pickle`: anything but numpy arrays is refused before it runs.
      output_dir: where the stores go.
      info_dir: optional Met ground truth; row counts are then checked against the JSON files
        and the paths and labels recorded.
      mini: whether the train rows follow mini_MET_database.json; None picks the database file
        whose length matches.
      overwrite: replace existing stores.
      metadata: extra manifest fields (e.g. backbone="r18INgem").

    Returns:
      {split: manifest}.

    Raises:
      tfmet.io.safe_pickle.UnsafePickleError: the pickle references other globals.
      ValueError: wrong content, counts that disagree with the JSON, or existing stores.
    """
    from tfmet.io.safe_pickle import load_reference_descriptors

    pickle_path = os.fspath(pickle_path)
    arrays = load_reference_descriptors(pickle_path)
    known = {REFERENCE_KEYS[k]: v for k, v in arrays.items() if k in REFERENCE_KEYS}
    if not known:
        raise ValueError(
            f"{pickle_path}: none of the keys {sorted(REFERENCE_KEYS)} found "
            f"(keys: {sorted(map(str, arrays))})"
        )
    for split in known:
        if has_store(output_dir, split) and not overwrite:
            raise ValueError(
                f"{manifest_path(output_dir, split)} exists; pass overwrite=True to replace it"
            )
    digest = file_sha256(pickle_path)
    manifests = {}
    for split, descriptors in known.items():
        extra = {"imported_from": os.path.abspath(pickle_path), "imported_sha256": digest}
        if info_dir is not None:
            gt = _matching_split(met, info_dir, split, mini, len(descriptors), pickle_path)
            extra.update(
                source=os.path.abspath(gt.source), paths=gt.paths, labels=gt.labels.tolist()
            )
        finite = np.isfinite(descriptors).all(axis=1)
        descriptors = np.where(finite[:, None], descriptors, 0.0).astype(np.float32)
        errors = [
            {"index": int(i), "reason": "non-finite values in the imported file"}
            for i in np.flatnonzero(~finite)
        ]
        manifests[split] = write_store(
            output_dir, split, descriptors, finite, errors, **extra, **metadata
        )
    return manifests


def _matching_split(met, info_dir, split, mini, count, pickle_path):
    candidates = [mini] if (mini is not None or split != "train") else [False, True]
    found = []
    for flag in candidates:
        path = met.split_file(info_dir, split, bool(flag))
        if mini is None and split == "train" and not os.path.exists(path):
            continue
        gt = met.load_split(info_dir, split, mini=bool(flag))
        if len(gt) == count:
            return gt
        found.append(f"{os.path.basename(gt.source)} has {len(gt)}")
    raise ValueError(
        f"{pickle_path}: {split}_descriptors has {count} rows but "
        + (", ".join(found) or f"no database file was found in {info_dir}")
    )
