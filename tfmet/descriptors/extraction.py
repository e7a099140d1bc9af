"""Descriptor extraction you can leave running overnight: chunked, resumable, sharded, mergeable.

A split's rows (JSON order) are cut into fixed chunks of `chunk_size` rows. Each chunk is
computed and written atomically as one file; a restarted run skips the chunks already on disk.
Chunk j belongs to shard `j % num_shards`, so shards share the same chunk files and merging is a
concatenation. Layout under `output_dir`:

    chunks/<split>/run.json           the settings the chunks were computed with, and the paths
    chunks/<split>/chunk-000000.npz   rows [0, chunk_size): descriptors, valid, errors
    <split>_descriptors.npy           the merged store (tfmet.descriptors.store)
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
import hashlib
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmet import backbones
from tfmet.backbones.batchnorm import fold_batchnorm
from tfmet.backbones.precision import check_precision, precision_version, set_precision
from tfmet.data import images as image_io
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.descriptors import store as store_lib
from tfmet.io.atomic import atomic_path, clean_stale_temporaries, save_json
from tfmet.io.hashing import file_sha256
from tfmet.io.json_files import read_json
from tfmet.io.progress import format_seconds
from tfmet.io.saved_models import load_keras_file

RUN_FILE = "run.json"
CHUNK_PATTERN = "chunk-{:06d}.npz"
DEFAULT_CHUNK_SIZE = 512
# `weights="imagenet"` (`--weights imagenet` in every program): the weights tfmet ships, those of
# the backbones named here (converted from the packaged checkpoint and cached on first use).
PACKAGED_WEIGHTS = "imagenet"
PACKAGED_BACKBONES = ("efficientnet_lite0",)


def weights_fingerprint(weights=None, seed=None):
    """What identifies a model's weights in a manifest: "sha256:<hex>" of the file, or
    "random:seed=<seed>" for a seeded random initialisation."""
    if weights is None:
        return f"random:seed={seed}"
    if os.path.isdir(weights):  # a checkpoint directory: its weights file identifies it
        from tfmet.backbones.huggingface import weights_file

        weights = weights_file(weights)
    return "sha256:" + file_sha256(weights)


@dataclasses.dataclass(frozen=True)
class ExtractionSpec:
    """Everything that determines the descriptors of a split, recorded in every output.

    Attributes:
      backbone: registry name of the backbone (or a saved model's name).
      weights: `weights_fingerprint` of the weights.
      scales: the extraction scales.
      resize_method: multi-scale resize method ("torch" or "tf").
      max_side: cap on the image's long side before extraction, or None for native size.
      dim: descriptor dimension.
      chunk_size: rows per chunk file.
      precision: what the backbone computed in ("float32", "bfloat16", "float16";
        `tfmet.backbones.precision`). Stores written before this field read as "float32".
        Where what a precision computes changed (`precision_version` > 1: bfloat16), the
        manifest also records "precision_version"; stores without it read as version 1.
    """

    backbone: str
    weights: str
    scales: tuple[float, ...]
    resize_method: str
    max_side: int | None
    dim: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    precision: str = "float32"

    def __post_init__(self):
        if int(self.chunk_size) <= 0:
            raise ValueError(f"`chunk_size` must be positive. Received: {self.chunk_size}")
        if self.max_side is not None and int(self.max_side) <= 0:
            raise ValueError(f"`max_side` must be positive or None. Received: {self.max_side}")
        if not self.scales or any(not 0 < float(s) <= 4 for s in self.scales):
            raise ValueError(f"`scales` must be in (0, 4]. Received: {self.scales}")
        check_precision(self.precision)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def metadata(self):
        """The manifest fields of this spec."""
        metadata = {
            "backbone": self.backbone,
            "weights_sha256": self.weights,
            "scales": list(self.scales),
            "resize_method": self.resize_method,
            "max_side": self.max_side,
            "chunk_size": self.chunk_size,
            "precision": self.precision,
        }
        version = precision_version(self.precision)
        if version != 1:  # float32 and float16 manifests stay as they were
            metadata["precision_version"] = version
        return metadata


def recorded_precision(metadata):
    """The precision a manifest or run record says its descriptors were computed in (stores
    written before precision was recorded are float32)."""
    return metadata.get("precision", "float32")


def recorded_precision_version(metadata):
    """The `precision_version` a manifest or run record gives (stores without it: 1)."""
    return int(metadata.get("precision_version", 1))


def check_same_precision(where, metadata, precision):
    """Raises ValueError (one line naming `where` and both precisions) unless `metadata` (a
    manifest or a run record's spec) records `precision`, in the version this tfmet computes."""
    recorded = recorded_precision(metadata)
    if recorded != precision:
        raise ValueError(
            f"{where} holds descriptors computed in {recorded}; refusing to add {precision} ones "
            f"(use --precision={recorded} or another --output_dir)"
        )
    version, current = recorded_precision_version(metadata), precision_version(precision)
    if version != current:
        raise ValueError(
            f"{where} holds {recorded} descriptors of precision_version {version} (an older "
            f"tfmet's {recorded}, computed differently); refusing to add version {current} ones "
            "(use another --output_dir)"
        )


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

    def write_chunk(self, chunk_id, start, descriptors, valid, errors):
        """Writes one chunk atomically; `errors` are (row, reason) pairs."""
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
                )

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

    def __init__(self, extractor, start, stop, dim, batch_images):
        self.extractor = extractor
        self.start = start
        self.descriptors = np.zeros((stop - start, dim), np.float32)
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
            descriptors = self.extractor(tf.stack([image for _, image in group])).numpy()
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
        for row, descriptor in zip(rows, descriptors, strict=True):
            if np.all(np.isfinite(descriptor)):
                self.descriptors[row - self.start] = descriptor
                self.valid[row - self.start] = True
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
    files = [os.fspath(f) for f in files]
    paths = list(files) if paths is None else [str(p) for p in paths]
    if len(paths) != len(files):
        raise ValueError(f"paths has {len(paths)} entries for {len(files)} files")
    if batch_images < 1:
        raise ValueError(f"`batch_images` must be >= 1. Received: batch_images={batch_images}")
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
    mine = shard_chunks(len(bounds), num_shards, shard_index)
    done = set(chunks.finished(mine))
    todo = [j for j in mine if j not in done]
    report.chunks_skipped = len(done)
    if done:
        absl_logging.info(
            "%s: resuming, %d of this shard's %d chunks already finished (skipped)",
            split,
            len(done),
            len(mine),
        )

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
        elements = iter(dataset)
        for j in todo:
            start, stop = bounds[j]
            buffer = _ChunkBuffer(extractor, start, stop, spec.dim, batch_images)
            _fill_chunk(buffer, elements, start, stop, bar)
            _check_model_health(buffer, split, j)
            errors = buffer.error_list()
            for row, reason in errors:
                absl_logging.warning("%s: row %d (%s) skipped: %s", split, row, paths[row], reason)
            chunks.write_chunk(j, start, buffer.descriptors, buffer.valid, errors)
            report.chunks_computed += 1
            report.images += stop - start
            report.failed += len(errors)
            bar.chunk_written(j, start, stop)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started

    if merge and num_shards == 1:
        merge_split(output_dir, split, keep_chunks=keep_chunks)
        report.merged = True
    return report


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


def folded_embedder(embedder):
    """A copy of `embedder` over `fold_batchnorm(embedder.backbone)` (itself if nothing folds).

    The GeM power and the projector's weights are copied; `embedder` is not changed.
    """
    from tfmet.descriptors.embedder import Embedder

    if not embedder.built:
        embedder.build((None, None, None, 3))
    backbone, folded = fold_batchnorm(embedder.backbone)
    if not folded:
        return embedder
    copy = Embedder(
        backbone,
        p=embedder.p,
        eps=embedder.eps,
        train_p=embedder.train_p,
        projector_dim=embedder.projector_dim,
        preprocessing=embedder.preprocessing,
        name=embedder.name,
    )
    copy.build((None, None, None, 3))
    copy.pool.set_weights(embedder.pool.get_weights())  # a trained GeM p
    if embedder.projector is not None:
        copy.projector.set_weights(embedder.projector.get_weights())
    absl_logging.info("folded %d BatchNorms into their convolutions for inference", folded)
    return copy


def packaged_weights(backbone):
    """The local file of the packaged `PACKAGED_WEIGHTS` ("imagenet") weights of `backbone`.

    Raises:
      ValueError: `backbone` ships without weights (only `PACKAGED_BACKBONES` have them).
    """
    if backbone not in PACKAGED_BACKBONES:
        raise ValueError(
            f"no packaged ImageNet weights for backbone {backbone!r}: convert a PyTorch "
            "checkpoint with tfmet-convert-weights and pass --weights FILE.weights.h5 (only "
            f"{', '.join(PACKAGED_BACKBONES)} ships with weights: --weights {PACKAGED_WEIGHTS})"
        )
    from tfmet.backbones import efficientnet_lite

    return efficientnet_lite.pretrained_weights()


def build_extractor(
    backbone=None,
    weights=None,
    model=None,
    seed=0,
    scales=None,
    resize_method="torch",
    max_side=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    fold_bn=False,
    precision="float32",
):
    """A `DescriptorExtractor` and the `ExtractionSpec` describing it.

    Args:
      backbone: registry name (`tfmet.backbones.names()`), used with `weights`.
      weights: local weights file for the backbone (a plain backbone file, or a converted
        "embedder" file that also holds GeM p and a projector: `tfmet.descriptors.conversion`),
        "imagenet" for the packaged weights (`packaged_weights`; recorded as their file's
        hash), or None for a random initialisation seeded with `seed` (recorded as
        "random:seed=<seed>").
      model: alternatively, a saved `Embedder` (.keras file), e.g. after contrastive training.
      seed: seed of a random initialisation.
      scales: extraction scales; None for the Met multi-scale `MET_SCALES`.
      resize_method, max_side, chunk_size: see `ExtractionSpec`.
      fold_bn: extract with a copy of the backbone whose BatchNorms are folded into the convs
        (`fold_batchnorm`): the same descriptors up to float rounding (~1e-7), a few % faster
        on CPU. The extractor's `embedder` is then that copy.
      precision: "float32" (default), "bfloat16" or "float16": the backbone's computation dtype
        (`tfmet.backbones.precision.set_precision`); GeM, L2 and the projector stay float32.
        Set on the embedder loaded or built here (a saved model's own policy is replaced).

    Raises:
      FileNotFoundError: `weights` or `model` does not exist.
      ValueError: neither or both of `backbone` and `model`, an unknown backbone or precision,
        "imagenet" for a backbone without packaged weights.
    """
    from tfmet.descriptors.embedder import MET_SCALES, DescriptorExtractor, Embedder

    check_precision(precision)
    if (backbone is None) == (model is None):
        raise ValueError("Give exactly one of `backbone` (with `weights`) and `model`.")
    if weights == PACKAGED_WEIGHTS and model is None:
        weights = packaged_weights(backbone)
    for path in (weights, model):
        if path is not None and not os.path.exists(path):  # a file, or a checkpoint directory
            raise FileNotFoundError(f"{path}: weights file not found")
    if model is not None:
        embedder = load_keras_file(model, "tfmet Embedder")
        if not isinstance(embedder, Embedder):
            raise ValueError(f"{model}: not a saved tfmet Embedder ({type(embedder).__name__})")
        name, fingerprint = embedder.backbone.name, weights_fingerprint(model)
    else:
        embedder = _registry_embedder(backbone, weights, seed)
        own_weights = backbones.spec(backbone).weights_file  # e.g. hf:<dir> loads its own
        if weights is None and own_weights is not None:
            weights = own_weights()
        name, fingerprint = backbone, weights_fingerprint(weights, seed)
    scales = MET_SCALES if scales is None else tuple(scales)
    if fold_bn:
        embedder = folded_embedder(embedder)
    set_precision(embedder.backbone, precision)
    extractor = DescriptorExtractor(embedder, scales=scales, resize_method=resize_method)
    spec = ExtractionSpec(
        backbone=name,
        weights=fingerprint,
        scales=scales,
        resize_method=resize_method,
        max_side=None if max_side is None else int(max_side),
        dim=embedder.output_dim,
        chunk_size=int(chunk_size),
        precision=precision,
    )
    return extractor, spec


def _is_converted_file(weights):
    return os.path.isfile(weights) and os.fspath(weights).endswith(".weights.h5")


def _registry_embedder(backbone, weights, seed):
    """The `Embedder` of registered `backbone` with `weights` (backbone or embedder file)."""
    from tfmet.backbones.torch_convert import read_metadata
    from tfmet.descriptors.conversion import load_embedder
    from tfmet.descriptors.embedder import Embedder

    if weights is None:
        keras.utils.set_random_seed(seed)
    elif _is_converted_file(weights) and read_metadata(weights).get("kind") == "embedder":
        return load_embedder(weights, arch=backbone)
    return Embedder.from_registry(backbone, weights=weights)


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
