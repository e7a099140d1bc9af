"""The chunk files of an extraction: one atomically written file per `chunk_size` rows.

    chunks/<split>/run.json           the settings the chunks were computed with, and the paths
    chunks/<split>/chunk-000000.npz   rows [0, chunk_size): descriptors, valid, errors

Chunk j belongs to shard `j % num_shards`, so shards share the same chunk files and merging
(`merge_split`) is a concatenation into the split's store (`tfmet.data.descriptor_store`). Chunks
computed with other settings are refused with the difference named.
"""

import hashlib
import os
import shutil

import numpy as np
from absl import logging as absl_logging

from tfmet.data import descriptor_store as store_lib
from tfmet.descriptors.spec import check_same_precision, recorded_precision
from tfmet.io.atomic import atomic_path, clean_stale_temporaries, save_json
from tfmet.io.json_files import read_json

RUN_FILE = "run.json"
CHUNK_PATTERN = "chunk-{:06d}.npz"


def chunk_bounds(count, chunk_size):
    """[(start, stop)] of the chunks of `count` rows."""
    return [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


def shard_chunks(num_chunks, num_shards=1, shard_index=0):
    """The chunk ids shard `shard_index` of `num_shards` computes (chunk j -> shard j % n)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            "Need num_shards >= 1 and 0 <= shard_index < num_shards. "
            f"Received: num_shards={num_shards}, shard_index={shard_index}"
        )
    return list(range(shard_index, num_chunks, num_shards))


def paths_sha256(paths):
    """sha256 of the newline-joined image paths: identifies a split's image list."""
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def run_record(split, spec, paths, labels=None, source=None):
    """The `run.json` contents recorded next to a split's chunks."""
    return {
        "split": split,
        "spec": spec.metadata() | {"dim": spec.dim},
        "count": len(paths),
        "paths_sha256": paths_sha256(paths),
        "paths": list(paths),
        "labels": None if labels is None else np.asarray(labels).tolist(),
        "source": source,
    }


class ChunkDirectory:
    """The chunk files of one split under `<output_dir>/chunks/<split>`."""

    def __init__(self, output_dir, split):
        self.output_dir = os.fspath(output_dir)
        self.split = split
        self.directory = os.path.join(self.output_dir, "chunks", split)

    @property
    def run_path(self):
        return os.path.join(self.directory, RUN_FILE)

    def chunk_path(self, chunk_id):
        return os.path.join(self.directory, CHUNK_PATTERN.format(chunk_id))

    def exists(self):
        return os.path.exists(self.run_path)

    def read_run(self):
        if not os.path.isfile(self.run_path):
            raise FileNotFoundError(
                f"{self.run_path}: no extraction of split {self.split!r} in {self.output_dir}"
            )
        return read_json(self.run_path, "extraction run record")

    def prepare(self, run):
        """Records `run` (settings + paths), or checks that the recorded one is the same."""
        clean_stale_temporaries(self.directory)  # chunk files a killed run was writing
        if not self.exists():
            os.makedirs(self.directory, exist_ok=True)
            save_json(self.run_path, run)
            return
        recorded = self.read_run()
        recorded["spec"] = {"precision": "float32"} | recorded.get("spec", {})
        check_same_precision(self.directory, recorded["spec"], run["spec"]["precision"])
        differences = [
            f"{key}: {recorded.get(key)!r} on disk, {run[key]!r} now"
            for key in ("spec", "count", "paths_sha256")
            if recorded.get(key) != run[key]
        ]
        if differences:
            raise ValueError(
                f"{self.directory} holds chunks computed with other settings ("
                + "; ".join(differences)
                + "). Use another --output_dir or delete that folder."
            )

    def finished(self, chunk_ids):
        return [j for j in chunk_ids if os.path.exists(self.chunk_path(j))]

    def write_chunk(self, chunk_id, start, descriptors, valid, errors, local=None):
        """Writes one chunk atomically; `errors` are (row, reason) pairs; `local`: None or
        the rows' local features, {name: array} (`tfmet.data.descriptor_store.LOCAL_ARRAYS`)."""
        rows = np.asarray([row for row, _ in errors], np.int64)
        reasons = np.asarray([reason for _, reason in errors], dtype=str)
        with atomic_path(self.chunk_path(chunk_id)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    start=np.int64(start),
                    descriptors=np.asarray(descriptors, np.float32),
                    valid=np.asarray(valid, bool),
                    error_rows=rows.reshape(-1),
                    error_reasons=reasons.reshape(-1),
                    **{f"local_{name}": array for name, array in (local or {}).items()},
                )

    def read_local_chunk(self, chunk_id, start, stop):
        """The local features {name: array} of a chunk's rows, checked against its rows."""
        path = self.chunk_path(chunk_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                local = {name: data[f"local_{name}"] for name in store_lib.LOCAL_ARRAYS}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: chunk {chunk_id} is missing") from None
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"{path}: no readable local features in the chunk ({e})") from None
        if any(len(array) != stop - start for array in local.values()):
            raise ValueError(f"{path}: local features do not cover rows [{start}, {stop})")
        return local

    def read_chunk(self, chunk_id, start, stop, dim, rows=True):
        """(descriptors [n, dim] or None, valid [n], [(row, reason)]) of a chunk, checked.

        `rows=False` skips loading the descriptors.
        """
        path = self.chunk_path(chunk_id)
        keys = ["start", "valid", "error_rows", "error_reasons"] + (["descriptors"] if rows else [])
        try:
            with np.load(path, allow_pickle=False) as data:
                chunk = {key: data[key] for key in keys}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: chunk {chunk_id} is missing") from None
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"{path}: unreadable chunk file ({e})") from None
        if (
            int(chunk["start"]) != start
            or chunk["valid"].shape != (stop - start,)
            or (rows and chunk["descriptors"].shape != (stop - start, dim))
        ):
            raise ValueError(f"{path}: chunk does not hold rows [{start}, {stop}) of dim {dim}")
        errors = list(
            zip(chunk["error_rows"].tolist(), chunk["error_reasons"].tolist(), strict=True)
        )
        return chunk.get("descriptors"), chunk["valid"], errors


def check_output_precision(output_dir, split, precision):
    """Raises ValueError (one line) when `output_dir` holds a store or chunks of `split`
    computed in another precision: a cheap check before a model is built."""
    if store_lib.has_store(output_dir, split):
        manifest = store_lib.read_manifest(output_dir, split)
        where = store_lib.manifest_path(output_dir, split)
        check_same_precision(where, manifest, precision)
    chunks = ChunkDirectory(output_dir, split)
    if chunks.exists():
        check_same_precision(chunks.directory, chunks.read_run().get("spec", {}), precision)


def check_existing_store(output_dir, split, spec, count, paths):
    """Raises ValueError unless the store of `split` was extracted with `spec` from `paths`."""
    manifest = store_lib.read_manifest(output_dir, split)
    manifest["precision"] = recorded_precision(manifest)
    check_same_precision(store_lib.manifest_path(output_dir, split), manifest, spec.precision)
    expected = spec.metadata() | {"dim": spec.dim, "count": count}
    differences = [
        f"{key}: {manifest.get(key)!r} in the store, {value!r} now"
        for key, value in expected.items()
        if manifest.get(key) != value
    ]
    if manifest.get("paths") is not None and manifest["paths"] != paths:
        differences.append("paths: the image list differs")
    if differences:
        raise ValueError(
            f"{store_lib.manifest_path(output_dir, split)} was extracted with other settings ("
            + "; ".join(differences)
            + "). Use another --output_dir or delete the store."
        )


def _merge_local(chunks, bounds, count, local_spec):
    """Writes the split's local arrays from its chunks; returns the manifest entry (the spec
    and the stored dimension, "local_dim": the projected one, or the map's when smaller)."""
    first = chunks.read_local_chunk(0, *bounds[0]) if bounds else None
    local_dim = int(first["descriptors"].shape[-1]) if first is not None else local_spec["dim"]
    blocks = (
        (start, chunks.read_local_chunk(j, start, stop)) for j, (start, stop) in enumerate(bounds)
    )
    store_lib.write_local_rows(
        chunks.output_dir, chunks.split, count, int(local_spec["num"]), local_dim, blocks
    )
    return dict(local_spec) | {"local_dim": local_dim}


def merge_split(output_dir, split, keep_chunks=True):
    """Merges a split's chunk files (from one or several shards) into its descriptor store.

    Raises:
      FileNotFoundError: no extraction of `split` in `output_dir`, or chunks are missing (the
        message lists them, e.g. because a shard has not finished).
      ValueError: a chunk file is unreadable or does not match the recorded run.
    """
    chunks = ChunkDirectory(output_dir, split)
    run = chunks.read_run()
    spec, count = run["spec"], int(run["count"])
    dim, chunk_size = int(spec["dim"]), int(spec["chunk_size"])
    bounds = chunk_bounds(count, chunk_size)
    missing = [j for j in range(len(bounds)) if not os.path.exists(chunks.chunk_path(j))]
    if missing:
        shown = ", ".join(str(j) for j in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{chunks.directory}: {len(missing)} of {len(bounds)} chunks missing ({shown}); "
            "finish every shard before merging"
        )
    paths = run["paths"]
    valid = np.zeros(count, bool)
    errors = []
    for j, (start, stop) in enumerate(bounds):
        _, valid[start:stop], chunk_errors = chunks.read_chunk(j, start, stop, dim, rows=False)
        errors.extend(
            {"index": int(row), "path": paths[row], "reason": reason}
            for row, reason in chunk_errors
        )
    blocks = (
        (start, chunks.read_chunk(j, start, stop, dim)[0]) for j, (start, stop) in enumerate(bounds)
    )
    metadata = {key: value for key, value in spec.items() if key != "dim"}
    metadata["precision"] = recorded_precision(spec)
    metadata.update(source=run.get("source"), paths=paths, labels=run.get("labels"))
    if spec.get("local_features"):
        metadata["local_features"] = _merge_local(chunks, bounds, count, spec["local_features"])
    manifest = store_lib.write_store_rows(
        output_dir, split, count, dim, blocks, valid, errors, **metadata
    )
    absl_logging.info(
        "%s: merged %d chunks into %s (%d rows, %d invalid)",
        split,
        len(bounds),
        store_lib.array_path(output_dir, split),
        count,
        int((~valid).sum()),
    )
    if not keep_chunks:
        shutil.rmtree(chunks.directory)
        parent = os.path.dirname(chunks.directory)
        if not os.listdir(parent):
            os.rmdir(parent)
    return manifest
