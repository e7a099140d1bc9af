"""Met descriptor extraction as an Apache Beam pipeline (DirectRunner, Dataflow, Flink, Spark).

The launcher (this module, on one machine) reads and validates the Met JSON, records each split's
`run.json` exactly as `tfmet.descriptors.chunk_files` does, and lists the chunks not yet on disk.
The pipeline then, on the workers:

    chunk tasks -> rows (paths from run.json) -> image bytes (Beam FileSystems: local, gs://, ...)
      -> RunInference(DescriptorModelHandler over the descriptor SavedModel), batched
      -> rows grouped per chunk -> chunk files            (merged by `tfmet-extract --merge`)
      -> failed rows as JSON lines                        (dead-letter output)

Chunks are the unit of work, of output and of resumption: a rerun skips the chunks already
written, by Beam or by the single-machine `tfmet-extract`, since both write the same files.

With local features (an `ExtractionSpec` whose `local` is a `LocalSpec`), the model is a
`LocalDescriptorModule` export whose `local_features` signature computes them as tfmet-extract
does; the chunks hold them, and merging writes the same `<split>_local_*.npy` arrays.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time

import apache_beam as beam
from absl import logging as absl_logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tfmet.beam import transforms
from tfmet.beam.chunks import ChunkOutput
from tfmet.beam.model_handler import METADATA_ASSET, DescriptorModelHandler
from tfmet.beam.paths import is_remote, read_bytes, upload_tree
from tfmet.data import descriptor_store as store_lib
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.descriptors import chunk_files
from tfmet.descriptors import spec as spec_lib
from tfmet.precision import precision_version

DEAD_LETTER_DIR = "dead_letter"
DEAD_LETTER_SUFFIX = ".jsonl"
SPEC_KEYS = ("backbone", "weights_sha256", "scales", "resize_method", "max_side", "dim")


# --- The descriptor model


def model_metadata(spec, local_dim=None):
    """The metadata `tfmet-export --kind descriptor` gives a raw (unwhitened) descriptor model;
    with local features (`spec.local`), also the dimension they are stored in, `local_dim`."""
    import tfmet

    metadata = {
        "kind": "descriptor",
        "tfmet_version": tfmet.__version__,
        **spec.metadata(),
        "dim": spec.dim,
        "pca_whitening": False,
    }
    if spec.local is not None:
        metadata["local_features"] = spec.local.metadata() | {"local_dim": int(local_dim)}
    return metadata


def read_model_metadata(model_uri):
    """The metadata asset of an exported descriptor SavedModel (FileNotFoundError, ValueError)."""
    path = FileSystems.join(os.fspath(model_uri), "assets", METADATA_ASSET)
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except OSError:
        raise FileNotFoundError(
            f"{path}: not found; is {model_uri} a SavedModel from tfmet-export --kind descriptor?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def model_local_dim(model_uri, local):
    """The dimension of the local features the model at `model_uri` computes as `local` (a
    `LocalSpec`) asks.

    Raises:
      ValueError: the model keeps no local features, or other ones (one line naming it).
    """
    recorded = read_model_metadata(model_uri).get("local_features")
    wanted = local.metadata()
    if recorded is None:
        raise ValueError(
            f"{model_uri}: the model computes no local features; --local_features needs a "
            "model exported with them (tfmet-extract-beam --local_features exports one)"
        )
    if {key: recorded.get(key) for key in wanted} != wanted or "local_dim" not in recorded:
        shown = {key: value for key, value in recorded.items() if key != "local_dim"}
        raise ValueError(
            f"{model_uri}: the model computes local features {shown}, not the {wanted} asked for"
        )
    return int(recorded["local_dim"])


def saved_model_spec(model_uri, chunk_size=spec_lib.DEFAULT_CHUNK_SIZE, local=None):
    """The `ExtractionSpec` of an exported descriptor SavedModel, from its metadata asset; with
    `local` (a `LocalSpec`), of its local features too, which the model must compute as asked.

    Raises:
      FileNotFoundError: no `assets/tfmet_metadata.json` under `model_uri`.
      ValueError: the metadata lacks a field, the model bakes in PCA-whitening (stores hold
        raw descriptors; whitening is learned from them afterwards), or it computes no such
        local features as `local` asks for.
    """
    path = FileSystems.join(os.fspath(model_uri), "assets", METADATA_ASSET)
    metadata = read_model_metadata(model_uri)
    missing = [key for key in SPEC_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    if metadata.get("kind", "descriptor") != "descriptor":
        raise ValueError(f"{model_uri}: a {metadata['kind']!r} export, not a descriptor model")
    if metadata.get("pca_whitening"):
        raise ValueError(
            f"{model_uri}: the model applies PCA-whitening; descriptor stores hold raw "
            "descriptors (export it without PCA)"
        )
    precision = spec_lib.recorded_precision(metadata)
    version = spec_lib.recorded_precision_version(metadata)
    if version != precision_version(precision):  # its stores would claim the current version
        raise ValueError(
            f"{model_uri}: exported by an older tfmet whose {precision} computed differently "
            f"(precision_version {version}); export it again"
        )
    if local is not None:
        model_local_dim(model_uri, local)
    max_side = metadata["max_side"]
    return spec_lib.ExtractionSpec(
        backbone=metadata["backbone"],
        weights=metadata["weights_sha256"],
        scales=tuple(metadata["scales"]),
        resize_method=metadata["resize_method"],
        max_side=None if max_side is None else int(max_side),
        dim=int(metadata["dim"]),
        chunk_size=int(chunk_size),
        precision=precision,
        local=local,
    )


def export_descriptor_model(extractor, spec, model_dir):
    """Exports `extractor` as a descriptor SavedModel at `model_dir` (local or remote).

    An export already at `model_dir` is reused when its metadata describes the same `spec` (a
    resumed run), and refused otherwise. With local features (`spec.local`; `extractor` is a
    `DescriptorExtractor(local=spec.local)`), the model also has the `local_features`
    signature. Returns `model_dir`.

    Raises:
      ValueError: `model_dir` holds a model with other settings.
    """
    from tfmet.export.common import metadata_signature, save_module

    model_dir = os.fspath(model_dir)
    if FileSystems.exists(FileSystems.join(model_dir, "assets", METADATA_ASSET)):
        try:
            existing = saved_model_spec(model_dir, spec.chunk_size, spec.local)
        except ValueError as e:
            existing = str(e).removeprefix(f"{model_dir}: ")
        if existing != spec:
            raise ValueError(
                f"{model_dir} holds a descriptor model with other settings ({existing}); use "
                "another --model_dir or delete it"
            )
        absl_logging.info("reusing the descriptor model in %s", model_dir)
        return model_dir
    module = _descriptor_module(extractor, spec)
    metadata = model_metadata(spec, getattr(module, "local_dim", None))
    signatures = module.signatures()
    scalars = {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
    signatures["metadata"] = metadata_signature(scalars)
    if not is_remote(model_dir):
        return save_module(module, model_dir, signatures, metadata)
    staging = tempfile.mkdtemp(prefix="tfmet-export-")
    try:
        local = save_module(module, os.path.join(staging, "model"), signatures, metadata)
        upload_tree(local, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _descriptor_module(extractor, spec):
    """The `DescriptorModule` (`LocalDescriptorModule` with `spec.local`) to export."""
    from tfmet.export.descriptor import DescriptorModule, LocalDescriptorModule

    kwargs = {"scales": spec.scales, "resize_method": spec.resize_method}
    if spec.local is None:
        return DescriptorModule(extractor.embedder, max_side=spec.max_side, **kwargs)
    if getattr(extractor, "local", None) != spec.local:
        raise ValueError(
            f"the spec keeps local features ({spec.local}); the extractor must give them "
            "(`DescriptorExtractor(local=spec.local)`)"
        )
    return LocalDescriptorModule(extractor.embedder, spec.local, max_side=spec.max_side, **kwargs)


# --- The launcher's plan


@dataclasses.dataclass
class ExtractionPlan:
    """What a Beam run has to compute.

    Attributes:
      spec: the `ExtractionSpec` every chunk is computed with.
      output_dir: where chunks (and, after merging, stores) go.
      image_root: folder (or URI) whose images/ subfolder holds the Met images.
      tasks: the chunks still to compute.
      counts: rows per split planned.
      finished: per split, chunks already on disk (skipped).
      complete: splits whose store already exists (nothing to do).
    """

    spec: spec_lib.ExtractionSpec
    output_dir: str
    image_root: str
    tasks: list
    counts: dict
    finished: dict
    complete: list

    @property
    def images(self):
        return sum(task.stop - task.start for task in self.tasks)


def plan_extraction(spec, met_splits, image_root, output_dir):
    """Records each split's run and lists the chunks still to compute.

    Args:
      spec: the `ExtractionSpec` of the model.
      met_splits: `MetSplit`s (`tfmet.data.met.load_split`, validated: load them all before
        exporting a model, so that a bad JSON file fails fast).
      image_root: folder or URI whose images/ subfolder holds the images.
      output_dir: folder or URI of the chunks (and, once merged, the stores).

    Raises:
      ValueError: `output_dir` holds chunks or a store computed with other settings.
    """
    output_dir, image_root = os.fspath(output_dir), os.fspath(image_root)
    plan = ExtractionPlan(spec, output_dir, image_root, [], {}, {}, [])
    for split in met_splits:
        name, count = split.split, len(split)
        plan.counts[name] = count
        if not is_remote(output_dir) and store_lib.has_store(output_dir, name):
            chunk_files.check_existing_store(output_dir, name, spec, count, split.paths)
            absl_logging.info("%s: store already complete in %s; nothing to do", name, output_dir)
            plan.complete.append(name)
            continue
        chunks = ChunkOutput(output_dir, name)
        source = os.path.abspath(split.source)
        chunks.prepare(chunk_files.run_record(name, spec, split.paths, split.labels, source))
        bounds = chunk_files.chunk_bounds(count, spec.chunk_size)
        done = set(chunks.finished(range(len(bounds))))
        plan.finished[name] = len(done)
        plan.tasks.extend(
            transforms.ChunkTask(name, j, start, stop)
            for j, (start, stop) in enumerate(bounds)
            if j not in done
        )
    return plan


# --- The pipeline


def is_failure(keyed_outcome):
    return keyed_outcome[1].descriptor is None


def build_pipeline(
    pipeline, plan, model_handler, dead_letter_prefix, max_bytes=DEFAULT_MAX_BYTES, local_dim=None
):
    """Adds the extraction of `plan.tasks` to `pipeline`; image files of more than `max_bytes`
    bytes are failed rows, never held whole. With `plan.spec.local`, the chunks also hold local
    features of dimension `local_dim` (`model_handler` made with `local=True`).

    Returns:
      (written, dead_letters): PCollections of (split, chunk_id, images, failed) per chunk file
      written, and of the failed rows' JSON lines (also written under `dead_letter_prefix`, only
      when there are any).
    """
    rows = (
        pipeline
        | "ChunkTasks" >> beam.Create(plan.tasks)
        | "ChunkRows" >> beam.ParDo(transforms.ExpandChunk(plan.output_dir, plan.image_root))
        | "SpreadRows" >> beam.Reshuffle()
    )
    read = rows | "ReadImageBytes" >> beam.ParDo(transforms.ReadImageBytes(max_bytes)).with_outputs(
        transforms.UNREADABLE, main="images"
    )
    described = (
        read.images
        | "Describe" >> RunInference(KeyedModelHandler(model_handler))
        | "Outcome" >> beam.Map(transforms.prediction_to_outcome)
    )
    outcomes = (described, read[transforms.UNREADABLE]) | "AllRows" >> beam.Flatten()
    dead_letters = (
        outcomes
        | "Failed" >> beam.Filter(is_failure)
        | "DeadLetterJson" >> beam.Map(transforms.dead_letter_line)
    )
    # No failed row, no file: an empty dead-letter file would read as "look here".
    dead_letters | "WriteDeadLetters" >> beam.io.WriteToText(
        dead_letter_prefix, file_name_suffix=DEAD_LETTER_SUFFIX, skip_if_empty=True
    )
    local = None if plan.spec.local is None else (plan.spec.local.num, local_dim)
    written = (
        outcomes
        | "ByChunk" >> beam.Map(transforms.by_chunk)
        | "GroupChunks" >> beam.GroupByKey()
        | "WriteChunks" >> beam.ParDo(transforms.WriteChunk(plan.output_dir, plan.spec.dim, local))
    )
    return written, dead_letters


def dead_letter_prefix(output_dir):
    """Where this run's dead-letter files go: `<output_dir>/dead_letter/<time>-NNNNN-of-NNNNN`."""
    return FileSystems.join(os.fspath(output_dir), DEAD_LETTER_DIR, time.strftime("%Y%m%d-%H%M%S"))


def read_dead_letters(output_dir):
    """Every dead-letter record under `output_dir` (all runs), sorted by split and index."""
    pattern = FileSystems.join(os.fspath(output_dir), DEAD_LETTER_DIR, "*" + DEAD_LETTER_SUFFIX)
    records = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        text = read_bytes(metadata.path).decode("utf-8")
        records.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return sorted(records, key=lambda r: (r["split"], r["index"]))


@dataclasses.dataclass
class BeamReport:
    """What a Beam run did (counters as the runner reports them).

    Attributes:
      state: the pipeline's final state ("DONE") or its state when not waited for.
      chunks, images, failed: chunk files written, images in them, images without descriptor.
      seconds: wall time of the pipeline, worker start-up and model loading included.
      inference_seconds: time spent in model calls, summed over workers (RunInference's own
        batch latency metric), so `images / inference_seconds` is one worker's steady rate.
      model_load_seconds: time spent loading the model, summed over workers.
      dead_letter_prefix: where the failed rows' JSON lines went (no file when none failed).
    """

    state: str
    chunks: int
    images: int
    failed: int
    seconds: float
    dead_letter_prefix: str
    inference_seconds: float = 0.0
    model_load_seconds: float = 0.0

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _metrics(result, namespace, name):
    return result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))


def _counter(result, name):
    query = _metrics(result, transforms.NAMESPACE, name)
    return int(sum(c.committed or 0 for c in query["counters"]))


def _distribution_sum(result, namespace, name):
    query = _metrics(result, namespace, name)
    return float(sum(d.committed.sum for d in query["distributions"] if d.committed))


def pipeline_options(beam_args=()):
    """Beam's `PipelineOptions`; "DirectRunner" (also the default) runs as its FnApiRunner.

    Beam's DirectRunner first tries to download and start the Prism runner, which does not
    honour --direct_num_workers / --direct_running_mode; the FnApiRunner is the engine the
    DirectRunner otherwise falls back to, so the pipeline runs the same, on the workers asked for.
    """
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "direct", "directrunner"):
        standard.runner = "FnApiRunner"
    return options


def run_extraction(
    plan,
    model_uri,
    beam_args=(),
    batch_size=8,
    intra_op_threads=0,
    wait=True,
    max_pixels=DEFAULT_MAX_PIXELS,
    max_bytes=DEFAULT_MAX_BYTES,
):
    """Runs the pipeline of `plan` with Beam options `beam_args` (e.g. ["--runner=DataflowRunner",
    "--project=...", ...]); `wait` blocks until it finishes (always true for DirectRunner).
    Images over `max_bytes` bytes or declaring more than `max_pixels` pixels are failed rows
    (`tfmet.data.limits`). With `plan.spec.local`, the model must compute those local features
    (`model_local_dim`; ValueError otherwise).

    Returns:
      a `BeamReport` (counts are zero when not waiting).
    """
    local = plan.spec.local
    local_dim = None if local is None else model_local_dim(model_uri, local)
    handler = DescriptorModelHandler(
        model_uri,
        max_side=plan.spec.max_side,
        batch_size=batch_size,
        intra_op_threads=intra_op_threads,
        max_pixels=max_pixels,
        local=local is not None,
    )
    namespace = handler.get_metrics_namespace()
    prefix = dead_letter_prefix(plan.output_dir)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build_pipeline(pipeline, plan, handler, prefix, max_bytes, local_dim)
    result = pipeline.run()
    if not wait:
        return BeamReport(str(result.state), len(plan.tasks), 0, 0, 0.0, prefix)
    state = result.wait_until_finish()
    seconds = time.perf_counter() - started
    report = BeamReport(
        str(state),
        _counter(result, "chunks_written"),
        _counter(result, "images"),
        _counter(result, "failed_images"),
        seconds,
        prefix,
        inference_seconds=_distribution_sum(result, namespace, "inference_batch_latency_micro_secs")
        / 1e6,
        model_load_seconds=_distribution_sum(result, namespace, "load_model_latency_milli_secs")
        / 1e3,
    )
    absl_logging.info(
        "Beam run %s: %d chunks, %d images (%d failed) in %.1f s, %.2f images/s; model calls "
        "%.1f s and model loading %.1f s, summed over workers",
        report.state,
        report.chunks,
        report.images,
        report.failed,
        report.seconds,
        report.images_per_second,
        report.inference_seconds,
        report.model_load_seconds,
    )
    return report
