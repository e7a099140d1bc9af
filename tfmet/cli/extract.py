"""tfmet-extract: Met descriptors for the database and query splits, resumable and shardable.

    tfmet-extract --info_dir=MET/ground_truth --image_root=MET --output_dir=desc/r18 \
        --backbone=resnet18 --weights=r18_imagenet.weights.h5 --mini

writes `<output_dir>/<split>_descriptors.npy` + `<split>_manifest.json` per split. Kill it and
run the same command again: finished chunks are kept. On several machines, run each with
`--num_shards=N --shard_index=i` into the same output folder, then `tfmet-extract --merge
--output_dir=...`. Settings can come from a config file (`--config=configs/extract_met.py`);
flags given on the command line override it (settings: the defaults <- the config file and its
`--config.<key>=<value>` <- flags given). `--local_features N` also keeps each image's N
strongest local features for spatial verification. Images whose header declares more than
--max_pixels pixels, files over --max_bytes and files that are not regular files (FIFOs, devices)
become invalid rows with the reason, never decoded. See docs/extraction.md.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from tfmet.cli import (
    input_flags,  # --max_pixels, --max_bytes
    model_flags,  # --backbone, --weights, --model, ...
)
from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, check_outputs, no_arguments, require, run_program

FLAGS = flags.FLAGS

# One flag per setting of tfmet.cli.settings.EXTRACT (MODEL and INPUT: model_flags, input_flags).
settings_lib.define_flags(settings_lib.EXTRACT, __name__)
flags.DEFINE_bool("merge", False, "Only merge finished shards' chunks into stores.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
config_flags.DEFINE_config_file("config", None, settings_lib.config_help("configs/extract_met.py"))


def settings():
    """The run's settings: the defaults, then the config file's, then the flags given."""
    values = settings_lib.resolve(settings_lib.extract_config(), FLAGS.config, "tfmet-extract")
    tables = (settings_lib.MODEL, settings_lib.INPUT, settings_lib.EXTRACT)
    settings_lib.check(values, *tables)
    for split in values["splits"]:
        if split not in ("train", "val", "test"):
            raise UsageError(f"--splits: unknown split {split!r} (use train, val, test)")
    if values["queries_only"]:
        if FLAGS["splits"].present and values["splits"] == ["train"]:
            raise UsageError("--queries_only leaves out train, the only split --splits names")
        values["splits"] = [s for s in values["splits"] if s != "train"] or ["val", "test"]
    check_numbers(values)
    return values


# Flags that must be positive integers when set (None: the default applies).
POSITIVE = ("max_side", "batch_images", "chunk_size", "num_shards", "local_dim")


def check_numbers(values):
    """Refuses values that make no sense before anything is written (a bad value recorded in
    run.json would block the corrected command); tfmet-extract-beam shares them."""
    input_flags.check(values)
    for name in POSITIVE:
        value = values.get(name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be a positive integer. Received: {value}")
    if (values.get("local_features") or 0) < 0:
        raise UsageError(
            f"--local_features must be 0 (none) or positive. Received: {values['local_features']}"
        )
    reads = values.get("num_parallel_reads")
    if reads is not None and reads != -1 and reads < 1:
        raise UsageError(
            f"--num_parallel_reads must be -1 (autotune) or positive. Received: {reads}"
        )
    shards, index = values.get("num_shards") or 1, values.get("shard_index") or 0
    if not 0 <= index < shards:
        raise UsageError(f"--shard_index must be in [0, --num_shards={shards}). Received: {index}")


def extract(values):
    from tfmet.data import met

    require(values, "info_dir", "image_root", "output_dir")
    # Validate the ground truth before TensorFlow loads: bad input fails in a fraction of a second.
    met_splits = [met.load_split(values["info_dir"], s, values["mini"]) for s in values["splits"]]
    for split in met_splits:  # every path stays below the image root, links followed
        met.image_paths(split, values["image_root"])
    model_flags.check_precision(values)

    from tfmet.descriptors import chunk_files, extraction

    for split in values["splits"]:  # before the model is built
        chunk_files.check_output_precision(values["output_dir"], split, values["precision"])

    from tfmet.descriptors.local import LocalSpec

    local = values["local_features"]
    extractor, spec = model_flags.build_extractor(
        values,
        chunk_size=values["chunk_size"],
        fold_bn=values["fold_bn"],
        local=LocalSpec(num=local, dim=values["local_dim"]) if local else None,
    )
    logging.info("extracting %s with %s", ", ".join(values["splits"]), spec)
    reports = extraction.extract_met(
        extractor,
        spec,
        met_splits,
        values["image_root"],
        values["output_dir"],
        num_shards=values["num_shards"],
        shard_index=values["shard_index"],
        batch_images=values["batch_images"],
        num_parallel_reads=values["num_parallel_reads"],
        progress=FLAGS.progress,
        keep_chunks=values["keep_chunks"],
        max_pixels=values["max_pixels"],
        max_bytes=values["max_bytes"],
    )
    for r in reports:
        logging.info(
            "%s: %d rows, %d chunks computed (%d images, %d unreadable, %.2f images/s), "
            "%d skipped as finished%s",
            r.split,
            r.count,
            r.chunks_computed,
            r.images,
            r.failed,
            r.images_per_second if r.images else 0.0,
            r.chunks_skipped,
            "; store written" if r.merged else "",
        )
    if values["num_shards"] > 1:
        logging.info("shard %d done; merge with tfmet-extract --merge", values["shard_index"])


def merge(values):
    from tfmet.descriptors import chunk_files

    require(values, "output_dir")
    for split in values["splits"]:
        chunk_files.merge_split(values["output_dir"], split, keep_chunks=values["keep_chunks"])


def main(argv):
    no_arguments(argv)
    values = settings()
    check_outputs(folders=("output_dir",), values=values)
    try:
        if FLAGS.merge:
            merge(values)
        else:
            extract(values)
    except RuntimeError as e:  # e.g. the model failing on every image: not the input's fault
        print(f"tfmet-extract: error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    run_program("tfmet-extract", main)


if __name__ == "__main__":
    run()
