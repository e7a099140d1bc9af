"""Changing a built ScaNN index in place: rows upserted into its tree, rows deleted from it.

A recogniser export keeps its ScaNN searcher as the tensors of ScaNN's module serialisation
(`scann_ops.ScannState`: the config, the trained partitioner and AH codebook, and per row its
leaf token, AH code and float row). Here

- `state_arrays(state)` reads them (numpy, by ScaNN's names);
- `upsert_rows(arrays, rows)` loads them into ScaNN's mutable (pybind) searcher, upserts the
  rows (each assigned to its nearest leaf and AH-encoded by the trained tree and codebook, as
  `tfmet.retrieval.scann_build.build_tree_by_chunks` adds every row of a chunked build) and
  serialises it again: the new rows come after the old ones, in order;
- `drop_rows(arrays, keep)` keeps the rows of a mask, in order (the tree, the codebook and the
  other rows' codes stay as they are);
- `graph_search(arrays, k, config)` is the in-graph search over such arrays
  (a `tfmet.retrieval.graph_search.ScannGraphSearch` given their state, without a new build).

The partitioner and the codebooks are not retrained: rows far from what they were trained on
lower the recall, which is why `tfmet.export.collection` measures it after every change.
"""

import os
import shutil
import tempfile

import numpy as np

from tfmet.retrieval.graph_search import ScannGraphSearch
from tfmet.retrieval.scann_build import contiguous32, scann_pybind

# ScannState's tensors in the order `scann_ops.ScannState` takes them, with their file names in
# ScaNN's pybind serialisation (a .pb holds a serialised proto, a .npy an array).
STATE = (
    ("scann_config", "scann_config.pb"),
    ("serialized_partitioner", "serialized_partitioner.pb"),
    ("datapoint_to_token", "datapoint_to_token.npy"),
    ("ah_codebook", "ah_codebook.pb"),
    ("hashed_dataset", "hashed_dataset.npy"),
    ("int8_dataset", "int8_dataset.npy"),
    ("int8_multipliers", "int8_multipliers.npy"),
    ("dp_norms", "dp_norms.npy"),
    ("dataset", "dataset.npy"),
)
PER_ROW = ("datapoint_to_token", "hashed_dataset", "int8_dataset", "dp_norms", "dataset")


def scann_ops():
    """ScaNN's TensorFlow ops, their library loaded (a SavedModel holding a ScaNN searcher needs
    it before it is loaded)."""
    from scann.scann_ops.py import scann_ops as ops

    return ops


def state_arrays(state):
    """{name: numpy array} of a `ScannState` (built or restored from a SavedModel)."""
    return {name: getattr(state, name).numpy() for name, _ in STATE}


def size(arrays):
    return int(arrays["dataset"].shape[0])


def _write(arrays, directory):
    from scann.scann_ops.py import scann_ops_pybind_backcompat

    for name, file in STATE:
        value = np.asarray(arrays[name])
        if file.endswith(".pb"):
            if value.size and value.reshape(-1)[0]:
                with open(os.path.join(directory, file), "wb") as f:
                    f.write(value.reshape(-1)[0])
        elif value.ndim and value.size:
            np.save(os.path.join(directory, file), value, allow_pickle=False)
    scann_ops_pybind_backcompat.populate_and_save_assets_proto(directory)


def _read(directory, like):
    arrays = {}
    for name, file in STATE:
        path = os.path.join(directory, file)
        if not os.path.exists(path):
            arrays[name] = like[name]  # what ScaNN holds none of (empty as before)
        elif file.endswith(".pb"):
            with open(path, "rb") as f:
                arrays[name] = np.asarray([f.read()], dtype=object)
        else:
            arrays[name] = np.load(path, allow_pickle=False)
    return arrays


def upsert_rows(arrays, rows, batch_size=256):
    """The arrays of the index with `rows` [n, d] added after its rows (see the module doc)."""
    rows = contiguous32(rows)
    before = size(arrays)
    scratch = tempfile.mkdtemp(prefix=".tfmet-scann-")
    try:
        _write(arrays, scratch)
        searcher = scann_pybind().load_searcher(scratch)
        searcher.searcher.upsert([None] * rows.shape[0], rows, batch_size)
        if searcher.size() != before + rows.shape[0]:
            raise RuntimeError(f"ScaNN holds {searcher.size()} rows after upserting {len(rows)}")
        out = os.path.join(scratch, "upserted")
        os.makedirs(out)
        searcher.serialize(out, relative_path=True)
        return _read(out, arrays)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def drop_rows(arrays, keep):
    """The arrays of the index with only the rows where `keep` [n] bool is true, in order."""
    keep = np.asarray(keep, bool)
    if keep.shape != (size(arrays),):
        raise ValueError(f"`keep` must have {size(arrays)} entries. Received: {keep.shape}")
    out = dict(arrays)
    for name in PER_ROW:
        value = np.asarray(arrays[name])
        if value.ndim and value.shape[0] == keep.shape[0]:
            out[name] = value[keep]
    return out


def graph_search(arrays, k, config):
    """The `ScannGraphSearch` over the arrays of an index changed in place (no build)."""
    import tensorflow as tf
    from scann.scann_ops.py import scann_ops

    state = scann_ops.ScannState([tf.constant(arrays[name]) for name, _ in STATE])
    return ScannGraphSearch(None, k, config, state=state)
