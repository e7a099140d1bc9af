r"""tfmet-extract-beam: Met descriptor extraction as an Apache Beam pipeline (tfmet[beam] extra).

Takes every tfmet-extract flag (same chunks, same stores), plus the Beam ones below; any other
`--name=value` goes to Beam's pipeline options (--project, --region, --temp_location,
--direct_num_workers, --flink_master, ...). Locally, on 4 worker processes:

    tfmet-extract-beam --info_dir=MET/ground_truth --image_root=MET --output_dir=desc/r18 \
        --backbone=resnet18 --weights=r18.weights.h5 \
        --direct_num_workers=4 --direct_running_mode=multi_processing

With a local --output_dir the chunks are merged into stores when the pipeline is done; on
gs:// copy the chunks down and run `tfmet-extract --merge`. Dataflow, Flink and Spark command
lines, and what must be staged for them: docs/beam.md.
"""

from absl import flags, logging

import tfmet.cli.extract as extract_cli  # defines the tfmet-extract flags this program shares
from tfmet.cli import model_flags
from tfmet.cli.common import UsageError, no_arguments, require, run_program

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "beam_runner",
    "DirectRunner",
    "Beam runner: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PortableRunner "
    "(a --runner given among the Beam options wins).",
)
flags.DEFINE_string(
    "saved_model",
    None,
    "A descriptor SavedModel from tfmet-export --kind descriptor (without PCA), instead of "
    "--backbone/--weights/--model.",
)
flags.DEFINE_string(
    "model_dir",
    None,
    "Where the model built from --backbone/--weights/--model is exported for the workers "
    "(default <output_dir>/model; must be readable by every worker).",
)
flags.DEFINE_integer("batch_size", 8, "Images per call of the model (RunInference batches).")
flags.DEFINE_integer("tf_threads", 0, "TensorFlow threads per worker process (0: TF default).")
flags.DEFINE_bool("wait", True, "Wait for the pipeline to finish (and report images/s).")
flags.DEFINE_bool(
    "merge_when_done", True, "With a local --output_dir, merge the chunks into stores at the end."
)

# Runners whose workers cannot see the launcher's disk.
REMOTE_RUNNERS = ("DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")
MODEL_FLAGS = model_flags.NAMES


def beam_options(args):
    """Beam's options from the leftover arguments, with --runner from --beam_runner.

    Raises:
      UsageError: an argument is neither a tfmet flag nor a Beam option (e.g. a typo).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.insert(0, f"--runner={FLAGS.beam_runner}")
    options = PipelineOptions(args)
    unknown = set(options.get_all_options(retain_unknown_options=True))
    unknown -= set(options.get_all_options())
    if unknown:
        raise UsageError(
            f"unknown flags (neither tfmet nor Beam): --{', --'.join(sorted(unknown))}"
        )
    return args, options.get_all_options()["runner"]


def _check_reachable(runner, paths):
    """Dataflow workers cannot read the launcher's disk; Flink/Spark ones only if it is shared."""
    from tfmet.beam.paths import is_remote

    local = [f"--{name}={path}" for name, path in paths.items() if not is_remote(path)]
    if not local or not any(runner.endswith(name) for name in REMOTE_RUNNERS):
        return
    if runner.endswith("DataflowRunner"):
        raise UsageError(f"Dataflow workers cannot read {', '.join(local)}: use gs:// paths")
    logging.warning(
        "%s workers must reach %s: use a shared file system (gs://, s3://, hdfs://) unless "
        "every worker mounts these paths",
        runner,
        ", ".join(local),
    )


def _model_uri(values):
    """Where the workers load the model from: --saved_model, or where this run exports it."""
    from tfmet.beam import paths

    if FLAGS.saved_model:
        given = [f"--{name}" for name in MODEL_FLAGS if FLAGS[name].present]
        if given:
            raise UsageError(f"--saved_model replaces {', '.join(given)}; give one or the other")
        return FLAGS.saved_model
    return FLAGS.model_dir or paths.join(values["output_dir"], "model")


def _model(values, model_uri):
    """The `ExtractionSpec` of the model at `model_uri`, exporting it there first if needed;
    --local_features N --local_dim D mean what they mean to tfmet-extract."""
    from tfmet.beam import pipeline
    from tfmet.descriptors.local import LocalSpec

    num = values["local_features"]
    local = LocalSpec(num=num, dim=values["local_dim"]) if num else None
    if FLAGS.saved_model:
        return pipeline.saved_model_spec(model_uri, values["chunk_size"], local)
    extractor, spec = model_flags.build_extractor(
        values, chunk_size=values["chunk_size"], fold_bn=values["fold_bn"], local=local
    )
    pipeline.export_descriptor_model(extractor, spec, model_uri)
    return spec


def _run(plan, model_uri, beam_args, values):
    """Runs the pipeline of `plan`; False when it was only submitted (--nowait)."""
    from tfmet.beam import pipeline

    report = pipeline.run_extraction(
        plan,
        model_uri,
        beam_args,
        batch_size=FLAGS.batch_size,
        intra_op_threads=FLAGS.tf_threads,
        wait=FLAGS.wait,
        max_pixels=values["max_pixels"],
        max_bytes=values["max_bytes"],
    )
    if not FLAGS.wait:
        logging.info(
            "pipeline submitted (%s); merge once it has finished; images that fail will be "
            "listed in %s-*.jsonl",
            report.state,
            report.dead_letter_prefix,
        )
        return False
    if report.failed:
        logging.info(
            "%d failed images are listed in %s-*.jsonl", report.failed, report.dead_letter_prefix
        )
    return True


def _merge_or_explain(values, pending):
    from tfmet.beam.paths import is_remote
    from tfmet.descriptors import chunk_files

    output_dir = values["output_dir"]
    if not pending:
        return
    if is_remote(output_dir) or not FLAGS.merge_when_done:
        logging.info(
            "chunks written; merge with: tfmet-extract --merge --output_dir=%s --splits=%s",
            "<local copy of the output dir>" if is_remote(output_dir) else output_dir,
            ",".join(pending),
        )
        return
    for split in pending:
        chunk_files.merge_split(output_dir, split, keep_chunks=values["keep_chunks"])


def extract(values, beam_args):
    from tfmet.data import met

    # Cheap checks first: bad input should fail before TensorFlow loads or a model is exported.
    require(values, "info_dir", "image_root", "output_dir")
    if values["num_shards"] != 1:
        raise UsageError("--num_shards is for tfmet-extract; Beam distributes the chunks itself")
    beam_args, runner = beam_options(beam_args)
    met_splits = [met.load_split(values["info_dir"], s, values["mini"]) for s in values["splits"]]
    model_flags.check_precision(values)
    model_uri = _model_uri(values)
    _check_reachable(
        runner,
        {
            "image_root": values["image_root"],
            "output_dir": values["output_dir"],
            "model_dir": model_uri,
        },
    )

    from tfmet.beam import pipeline

    spec = _model(values, model_uri)
    plan = pipeline.plan_extraction(spec, met_splits, values["image_root"], values["output_dir"])
    logging.info(
        "%d chunks (%d images) to compute with %s on %s; already finished: %s; complete: %s",
        len(plan.tasks),
        plan.images,
        spec,
        runner,
        plan.finished,
        plan.complete or "none",
    )
    if plan.tasks and not _run(plan, model_uri, beam_args, values):
        return
    _merge_or_explain(values, [s for s in values["splits"] if s not in plan.complete])


def main(argv):
    values = extract_cli.settings()
    if FLAGS.merge:
        no_arguments(argv)
        extract_cli.merge(values)
    else:
        extract(values, argv[1:])


def run():
    # absl parses its flags; everything else is left for Beam's pipeline options.
    run_program("tfmet-extract-beam", main, known_only=True)


if __name__ == "__main__":
    run()
