"""Descriptor extraction you can leave running overnight: chunked, resumable, sharded, mergeable.

A split's rows (JSON order) are cut into fixed chunks of `chunk_size` rows. Each chunk is
computed and written atomically as one file; a restarted run skips the chunks already on disk.
Chunk j belongs to shard `j % num_shards`, so shards share the same chunk files and merging is a
concatenation (`tfmet.descriptors.chunk_files`; the settings recorded with them are an
`ExtractionSpec`, `tfmet.descriptors.spec`). Layout under `output_dir`:

    chunks/<split>/run.json           the settings the chunks were computed with, and the paths
    chunks/<split>/chunk-000000.npz   rows [0, chunk_size): descriptors, valid, errors
    <split>_descriptors.npy           the merged store (tfmet.data.descriptor_store)
    <split>_manifest.json

Chunks computed with other settings (backbone, weights, scales, resize, max side, chunk size,
precision, image list) are never mixed in: the run stops with an error naming the difference.

Images are read and decoded in parallel by tf.data (`tfmet.data.images.load_images`) at native
resolution. Files that cannot be read or decoded, and images on which the model fails or gives a
non-finite descriptor, become zero rows with valid=False and a recorded reason; the run goes on.
So do files that are not regular files (FIFOs, devices, directories), files over `max_bytes`
and images whose header declares more than `max_pixels` pixels: they are refused before they are
read or decoded, so memory stays bounded whatever the image tree holds.
"""

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmet.data import descriptor_store as store_lib
from tfmet.data import images as image_io
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.descriptors.chunk_files import (
    ChunkDirectory,
    check_existing_store,
    chunk_bounds,
    merge_split,
    run_record,
    shard_chunks,
)
from tfmet.io.progress import format_seconds


@dataclasses.dataclass
class SplitReport:
    """What one `extract_split` call did."""

    split: str
    count: int
    chunks_total: int
    chunks_skipped: int
    chunks_computed: int
    images: int
    failed: int
    seconds: float
    merged: bool = False

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class _Progress:
    """A tqdm bar (images/s, ETA) when `enabled`, plus one log line per chunk."""

    def __init__(self, split, total, enabled):
        self.split = split
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc=split, dynamic_ncols=True)

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def chunk_written(self, chunk_id, start, stop):
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        absl_logging.info(
            "%s: computed chunk %d (rows %d-%d); %d/%d images this run, %.2f images/s, ETA %s",
            self.split,
            chunk_id,
            start,
            stop - 1,
            self.done,
            self.total,
            rate,
            format_seconds(eta),
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _ChunkBuffer:
    """Collects one chunk's rows, running the model on groups of equal-size images."""

    def __init__(self, extractor, start, stop, dim, batch_images, local=None):
        self.extractor = extractor
        self.start = start
        self.descriptors = np.zeros((stop - start, dim), np.float32)
        self.local = None  # {name: array} when the spec keeps local features
        if local is not None:
            self.local = store_lib.empty_local_rows(stop - start, local.num, extractor.local_dim)
        self.valid = np.zeros(stop - start, bool)
        self.errors = {}
        self.batch_images = batch_images
        self.pending = {}  # (h, w) -> [(row, image)]
        self.num_pending = 0
        self.model_failures = 0
        self.readable = 0  # images that reached the model
        self.non_finite = 0  # of which the model's descriptor had NaN or infinite values

    def add_failure(self, row, reason):
        self.errors[row] = reason

    def add_image(self, row, image):
        self.readable += 1
        key = tuple(image.shape[:2])
        group = self.pending.setdefault(key, [])
        group.append((row, image))
        self.num_pending += 1
        if len(group) >= self.batch_images:
            self._run(key)
        elif self.num_pending >= 4 * self.batch_images:  # bound memory: flush the largest group
            self._run(max(self.pending, key=lambda k: len(self.pending[k])))

    def flush(self):
        for key in list(self.pending):
            self._run(key)

    def _run(self, key):
        group = self.pending.pop(key)
        self.num_pending -= len(group)
        self._embed(group)

    def _embed(self, group):
        """Runs the model on images of one size; on failure retries them one at a time."""
        rows = [row for row, _ in group]
        try:
            images = tf.stack([image for _, image in group])
            if self.local is None:
                descriptors, local = self.extractor(images).numpy(), None
            else:
                descriptors, *local = (t.numpy() for t in self.extractor.extract_local(images))
        except (tf.errors.OpError, ValueError) as e:
            if len(group) > 1:
                for item in group:
                    self._embed([item])
                return
            self.errors[rows[0]] = "model failed: " + image_io.error_reason(e)
            self.model_failures += 1
            return
        if descriptors.shape != (len(group), self.descriptors.shape[1]):
            raise ValueError(
                f"the extractor returned shape {descriptors.shape} for {len(group)} images; "
                f"the spec says dim={self.descriptors.shape[1]}"
            )
        for i, (row, descriptor) in enumerate(zip(rows, descriptors, strict=True)):
            if np.all(np.isfinite(descriptor)):
                self.descriptors[row - self.start] = descriptor
                self.valid[row - self.start] = True
                if local is not None:
                    store_lib.set_local_row(
                        self.local, row - self.start, *(array[i] for array in local)
                    )
            else:
                self.errors[row] = "model gave a non-finite descriptor"
                self.non_finite += 1

    def error_list(self):
        return sorted(self.errors.items())


def extract_split(
    extractor,
    spec,
    split,
    files,
    output_dir,
    paths=None,
    labels=None,
    source=None,
    num_shards=1,
    shard_index=0,
    batch_images=1,
    num_parallel_reads=tf.data.AUTOTUNE,
    progress=True,
    merge=True,
    keep_chunks=False,
    max_pixels=DEFAULT_MAX_PIXELS,
    max_bytes=DEFAULT_MAX_BYTES,
):
    """Extracts one split's descriptors into chunk files, then (unsharded) merges them.

    Args:
      extractor: callable images [B, H, W, 3] in [0, 255] -> descriptors [B, spec.dim], e.g. a
        `DescriptorExtractor`.
      spec: the `ExtractionSpec` (recorded; used to check resumed chunks).
      split: split name, used for file names.
      files: image files to read, one per row.
      output_dir: where chunks and the store go.
      paths: the rows' paths as recorded in the manifest (default `files`), e.g. JSON paths.
      labels: optional int labels recorded in the manifest.
      source: optional ground-truth file recorded in the manifest.
      num_shards, shard_index: compute only chunks j with j % num_shards == shard_index.
      batch_images: up to this many images of the same size go through the model together.
      num_parallel_reads: tf.data parallelism of reading + decoding.
      progress: show a progress bar.
      merge: with one shard, write the store once every chunk exists.
      keep_chunks: keep the chunk files after merging (they are deleted by default).
      max_pixels: an image whose header declares more pixels is an invalid row, never decoded
        (None: no limit).
      max_bytes: a file of more bytes is an invalid row, never read (None: no limit).

    Returns:
      a `SplitReport`.
    """
    files, paths = _check_arguments(extractor, spec, files, paths, batch_images)
    count = len(files)
    bounds = chunk_bounds(count, spec.chunk_size)
    report = SplitReport(split, count, len(bounds), 0, 0, 0, 0, 0.0)

    if store_lib.has_store(output_dir, split):
        check_existing_store(output_dir, split, spec, count, paths)
        absl_logging.info("%s: store already complete in %s; nothing to do", split, output_dir)
        report.chunks_skipped = len(bounds)
        return report

    chunks = ChunkDirectory(output_dir, split)
    chunks.prepare(run_record(split, spec, paths, labels, source))
    todo = _chunks_to_compute(chunks, split, len(bounds), num_shards, shard_index, report)

    rows = [row for j in todo for row in range(*bounds[j])]
    started = time.perf_counter()
    bar = _Progress(split, len(rows), progress)
    try:
        dataset = image_io.load_images(
            [files[r] for r in rows],
            max_side=spec.max_side,
            num_parallel_calls=num_parallel_reads,
            indices=rows,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
        ).prefetch(tf.data.AUTOTUNE)
        _compute_chunks(
            extractor,
            spec,
            split,
            paths,
            bounds,
            todo,
            iter(dataset),
            chunks,
            bar,
            report,
            batch_images,
        )
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started

    if merge and num_shards == 1:
        merge_split(output_dir, split, keep_chunks=keep_chunks)
        report.merged = True
    return report


def _check_arguments(extractor, spec, files, paths, batch_images):
    """`extract_split`'s arguments checked before any work; returns (files, paths) as lists."""
    files = [os.fspath(f) for f in files]
    paths = list(files) if paths is None else [str(p) for p in paths]
    if len(paths) != len(files):
        raise ValueError(f"paths has {len(paths)} entries for {len(files)} files")
    if batch_images < 1:
        raise ValueError(f"`batch_images` must be >= 1. Received: batch_images={batch_images}")
    if spec.local is not None and getattr(extractor, "local", None) != spec.local:
        raise ValueError(
            f"the spec keeps local features ({spec.local}); the extractor must give them "
            "(`DescriptorExtractor(local=spec.local)`)"
        )
    return files, paths


def _chunks_to_compute(chunks, split, num_chunks, num_shards, shard_index, report):
    """This shard's chunks not finished by an earlier run (those are counted as skipped)."""
    mine = shard_chunks(num_chunks, num_shards, shard_index)
    done = set(chunks.finished(mine))
    report.chunks_skipped = len(done)
    if done:
        absl_logging.info(
            "%s: resuming, %d of this shard's %d chunks already finished (skipped)",
            split,
            len(done),
            len(mine),
        )
    return [j for j in mine if j not in done]


def _compute_chunks(
    extractor, spec, split, paths, bounds, todo, elements, chunks, bar, report, batch_images
):
    """Runs the model on the decoded `elements` of the chunks `todo`, writing each chunk file."""
    for j in todo:
        start, stop = bounds[j]
        buffer = _ChunkBuffer(extractor, start, stop, spec.dim, batch_images, spec.local)
        _fill_chunk(buffer, elements, start, stop, bar)
        _check_model_health(buffer, split, j)
        errors = buffer.error_list()
        for row, reason in errors:
            absl_logging.warning("%s: row %d (%s) skipped: %s", split, row, paths[row], reason)
        chunks.write_chunk(j, start, buffer.descriptors, buffer.valid, errors, buffer.local)
        report.chunks_computed += 1
        report.images += stop - start
        report.failed += len(errors)
        bar.chunk_written(j, start, stop)


# A chunk in which the model failed on this many images and succeeded on none is not bad luck
# with a few files but a broken model or machine: stop instead of writing empty rows.
SYSTEMATIC_FAILURES = 8


def _fill_chunk(buffer, elements, start, stop, bar):
    """Runs the model on rows [start, stop) of the decoded `elements` into `buffer`."""
    for _ in range(start, stop):
        element = next(elements)
        row = int(element["index"])
        if bool(element["ok"]):
            buffer.add_image(row, element["image"])
        else:
            buffer.add_failure(row, element["error"].numpy().decode("utf-8"))
        bar.update(1)
    buffer.flush()


def _check_model_health(buffer, split, chunk_id):
    if buffer.readable and buffer.non_finite == buffer.readable:
        # Not a few odd images: a model whose every output is NaN/inf (e.g. broken weights).
        raise RuntimeError(
            f"{split}: the model gave non-finite (NaN or infinite) descriptors for all "
            f"{buffer.readable} readable images of chunk {chunk_id}: its weights or inputs are "
            "broken; stopping. Finished chunks are kept."
        )
    if buffer.model_failures >= SYSTEMATIC_FAILURES and not buffer.valid.any():
        first = next(r for r in buffer.errors.values() if r.startswith("model failed"))
        raise RuntimeError(
            f"{split}: the model failed on all {buffer.model_failures} readable images of chunk "
            f"{chunk_id} (first: {first}); stopping. Finished chunks are kept."
        )


def load_met_splits(info_dir, splits=("train", "val", "test"), mini=False):
    """Reads and validates the Met ground truth of `splits` (fail fast, before any work)."""
    from tfmet.data import met

    return [met.load_split(info_dir, split, mini=mini) for split in splits]


def extract_met(extractor, spec, met_splits, image_root, output_dir, **kwargs):
    """`extract_split` for each `MetSplit` (see `load_met_splits`); images under `image_root`.

    `kwargs` go to `extract_split` (sharding, batching, progress, merging). Returns the reports.
    """
    from tfmet.data import met

    reports = []
    for split in met_splits:
        reports.append(
            extract_split(
                extractor,
                spec,
                split.split,
                met.image_paths(split, image_root),
                output_dir,
                paths=split.paths,
                labels=split.labels,
                source=os.path.abspath(split.source),
                **kwargs,
            )
        )
    return reports
