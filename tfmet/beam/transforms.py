"""The steps of the Beam extraction: chunk -> rows -> image bytes -> descriptors -> chunk files.

Elements between steps:

    ChunkTask  (split, chunk_id, start, stop)          one chunk file to compute
    RowKey     (split, chunk_id, start, stop, row, path, file)   one image of a chunk
    (RowKey, Described)                               its descriptor (and local features),
                                                      or None and the reason

Unreadable files and images the model cannot describe never fail the pipeline: they become rows
with a reason, recorded in the chunk (and so in the merged store's "errors") and sent to the
dead-letter output.
"""

import json
import time
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from absl import logging as absl_logging

from tfmet.beam.chunks import ChunkOutput
from tfmet.beam.model_handler import Described
from tfmet.beam.paths import is_remote, join, read_bytes
from tfmet.data import descriptor_store as store
from tfmet.data.limits import DEFAULT_MAX_BYTES

NAMESPACE = "tfmet"
UNREADABLE = "unreadable"


class ChunkTask(NamedTuple):
    """Rows [start, stop) of a split, written as chunk `chunk_id`."""

    split: str
    chunk_id: int
    start: int
    stop: int


class RowKey(NamedTuple):
    """One image: its chunk, its row in the split, its JSON path and the file to read."""

    split: str
    chunk_id: int
    start: int
    stop: int
    row: int
    path: str
    file: str


def image_file(image_root, path):
    """`<image_root>/images/<path>`, on a local disk (checked as tfmet.data.met does) or remote."""
    from tfmet.data import met

    if not is_remote(image_root):
        return met.resolve_image_path(image_root, path)
    met.check_relative_path(path)
    return join(image_root, "images", *path.split("/"))


class ExpandChunk(beam.DoFn):
    """ChunkTask -> the RowKeys of its rows, with paths from the split's recorded `run.json`."""

    def __init__(self, output_dir, image_root):
        self.output_dir = output_dir
        self.image_root = image_root

    def setup(self):
        self._paths = {}

    def process(self, task):
        paths = self._paths.get(task.split)
        if paths is None:  # one read per split and worker: run.json holds every path
            paths = ChunkOutput(self.output_dir, task.split).read_run()["paths"]
            self._paths[task.split] = paths
        for row in range(task.start, task.stop):
            file = image_file(self.image_root, paths[row])
            yield RowKey(*task, row, paths[row], file)


class ReadImageBytes(beam.DoFn):
    """RowKey -> (RowKey, bytes); a file that cannot be read goes to the UNREADABLE output."""

    def __init__(self, max_bytes=DEFAULT_MAX_BYTES):
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.unreadable = beam.metrics.Metrics.counter(NAMESPACE, "unreadable_files")

    def _read(self, path):
        from tfmet.data.images import ImageRefused, read_image_bytes

        if not is_remote(path):
            # Read as tfmet-extract reads it: a regular file of at most `max_bytes` (a FIFO would
            # block the worker forever, a link to /dev/zero fill its memory).
            return read_image_bytes(path, self.max_bytes)
        # An object store has no FIFOs, but an object can be of any size: read one byte past the
        # limit at most, so a huge object is refused without being held.
        data = read_bytes(path, None if self.max_bytes is None else self.max_bytes + 1)
        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise ImageRefused(f"file holds more than the limit of {self.max_bytes:,} bytes")
        return data

    def process(self, key):
        from tfmet.data.images import error_reason

        try:
            data = self._read(key.file)
        # Any exception: besides OSErrors, remote file systems raise their own client errors
        # (e.g. google.api_core NotFound), and one bad file must not fail the pipeline.
        except Exception as e:
            self.unreadable.inc()
            yield beam.pvalue.TaggedOutput(UNREADABLE, (key, Described(None, error_reason(e))))
            return
        yield key, data


def prediction_to_outcome(keyed_prediction):
    """(RowKey, PredictionResult of Described) -> (RowKey, Described)."""
    key, prediction = keyed_prediction
    return key, prediction.inference


def dead_letter_line(keyed_outcome):
    """A failed row as one JSON line: split, index, path (as in the JSON), file, reason."""
    key, outcome = keyed_outcome
    return json.dumps(
        {
            "split": key.split,
            "index": key.row,
            "path": key.path,
            "file": key.file,
            "reason": outcome.reason,
        },
        sort_keys=True,
    )


def by_chunk(keyed_outcome):
    """(RowKey, Described) -> ((split, chunk_id, start, stop), (row, descriptor, reason, local))."""
    key, outcome = keyed_outcome
    return (key.split, key.chunk_id, key.start, key.stop), (key.row, *outcome)


class WriteChunk(beam.DoFn):
    """A chunk's grouped rows -> its chunk file; emits (split, chunk_id, images, failed).

    With `local` = (num, local_dim), the chunk also holds the rows' local features, laid out as
    the single-machine extraction lays them out (`tfmet.data.descriptor_store.LOCAL_ARRAYS`).
    """

    def __init__(self, output_dir, dim, local=None):
        self.output_dir = output_dir
        self.dim = int(dim)
        self.local = None if local is None else tuple(int(n) for n in local)
        self.images = beam.metrics.Metrics.counter(NAMESPACE, "images")
        self.failed = beam.metrics.Metrics.counter(NAMESPACE, "failed_images")
        self.chunks = beam.metrics.Metrics.counter(NAMESPACE, "chunks_written")

    def setup(self):
        self._started = time.perf_counter()
        self._done = 0

    def process(self, element):
        (split, chunk_id, start, stop), rows = element
        descriptors = np.zeros((stop - start, self.dim), np.float32)
        valid = np.zeros(stop - start, bool)
        local = None if self.local is None else store.empty_local_rows(stop - start, *self.local)
        errors = {}
        for row, descriptor, reason, features in rows:
            if descriptor is None:
                errors[row] = reason
            else:
                descriptors[row - start] = descriptor
                valid[row - start] = True
                if local is not None:
                    store.set_local_row(local, row - start, *features)
        seen = set(errors) | {start + i for i in np.flatnonzero(valid)}
        if len(seen) != stop - start:  # a lost element is a runner bug: never write a hole
            missing = sorted(set(range(start, stop)) - seen)
            raise RuntimeError(f"{split} chunk {chunk_id}: rows {missing[:5]} never arrived")
        errors = sorted(errors.items())
        chunks = ChunkOutput(self.output_dir, split)
        chunks.write_chunk(chunk_id, start, descriptors, valid, errors, local)
        self.images.inc(stop - start)
        self.failed.inc(len(errors))
        self.chunks.inc()
        self._done += stop - start
        elapsed = time.perf_counter() - self._started
        absl_logging.info(
            "%s: wrote chunk %d (rows %d-%d, %d failed); this worker: %d images, %.2f images/s",
            split,
            chunk_id,
            start,
            stop - 1,
            len(errors),
            self._done,
            self._done / elapsed if elapsed > 0 else 0.0,
        )
        yield split, chunk_id, stop - start, len(errors)
