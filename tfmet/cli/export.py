r"""tfmet-export: write a SavedModel for serving.

    tfmet-export --kind descriptor --backbone resnet18 --weights r18.weights.h5 --out exports/desc
    tfmet-export --kind recognizer --backbone resnet18 --weights r18.weights.h5 \
        --descriptor_dir descriptors/ --info_dir met/ --results_json knn/knn_results.json \
        --out exports/rec
    tfmet-export --kind style --style_model runs/pandora18k --out exports/style

The descriptor and recogniser exports take the model exactly as tfmet-extract does (--backbone +
--weights, or --model for a saved Embedder; --precision=bfloat16 or float16 computes the backbone
in reduced precision, GeM, L2, PCA-whitening and the kNN staying float32). The recogniser also
needs the database: the train descriptor store that tfmet-extract wrote (--descriptor_dir) with
its labels (--info_dir), the PCA-whitening (--pca, or fitted again on the train descriptors with
--dim, as tfmet-knn-eval does; --raw for none) and the tuned k and tau (--k/--tau, or
--results_json from tfmet-knn-eval).

Every export's serving signature refuses, as invalid rows, images declaring more than
--max_pixels pixels (checked in the header, before decoding) or holding more than --max_bytes
bytes; both are recorded in the export's metadata.
"""

from absl import flags

from tfmet.cli import (
    input_flags,  # --max_pixels, --max_bytes
    model_flags,  # the descriptor model, as tfmet-extract
)
from tfmet.cli.common import UsageError, check_outputs, no_arguments, run_program
from tfmet.retrieval import SEARCHERS

FLAGS = flags.FLAGS

flags.DEFINE_enum("kind", None, ["descriptor", "style", "recognizer"], "What to export.")
flags.DEFINE_string("out", None, "Export directory (must not exist or be empty, unless --force).")
flags.DEFINE_bool("force", False, "Overwrite an existing export directory.")
# PCA-whitening.
flags.DEFINE_string("pca", None, "PCA-whitening .npz (tfmet.retrieval.PCAWhitening.save).")
flags.DEFINE_integer("dim", 512, "With --descriptor_dir and no --pca: fit PCAw to this dim.")
flags.DEFINE_bool("raw", False, "No PCA-whitening.")
# Recogniser database and classifier.
flags.DEFINE_string("descriptor_dir", None, "tfmet-extract output with the train store.")
flags.DEFINE_string("info_dir", None, "Met ground truth folder (database labels).")
flags.DEFINE_bool("mini", False, "The database is mini_MET_database.json.")
flags.DEFINE_integer("k", None, "kNN neighbours (default: from --results_json).")
flags.DEFINE_float("tau", None, "Softmax inverse temperature (default: from --results_json).")
flags.DEFINE_string("results_json", None, "tfmet-knn-eval results.json with the tuned k, t, dim.")
flags.DEFINE_float(
    "threshold", None, "Operating threshold (default: from --results_json, else accept all)."
)
flags.DEFINE_enum(
    "searcher",
    "exact",
    list(SEARCHERS),
    "Recogniser neighbour search (tfmet.retrieval.SEARCHERS).",
)
flags.DEFINE_enum(
    "rerank",
    "none",
    ["none", "spatial"],
    "Recogniser: serve spatial re-ranking as tuned by tfmet-knn-eval --rerank=spatial (its "
    "--results_json; the train store's local features go into the export).",
)
flags.DEFINE_integer("top_k", 5, "Candidates returned per image (recogniser and style).")
# Style classifier.
flags.DEFINE_string("style_model", None, "tfmet-train-style run directory or .keras file.")
flags.DEFINE_integer("image_size", None, "Style input size (default: the run's).")
flags.DEFINE_bool("trust_model", False, "Allow loading hub modules (SavedModel programs).")


def _limits():
    """--max_pixels and --max_bytes: what the export's serving signature refuses to decode."""
    return {name: FLAGS[name].value for name in input_flags.NAMES}


def _export_descriptor():
    from tfmet.export import builders

    extractor, spec = model_flags.build_extractor(model_flags.values())
    return builders.build_descriptor(
        extractor, spec, pca=None if FLAGS.raw else FLAGS.pca, **_limits()
    )


def _export_recognizer():
    from tfmet.export import builders

    if not FLAGS.descriptor_dir or not FLAGS.info_dir:
        raise UsageError("the recogniser needs --descriptor_dir and --info_dir")
    approximate = SEARCHERS[FLAGS.searcher].approximate
    try:
        k, tau, dim = builders.classifier_settings(
            FLAGS.results_json, FLAGS.k, FLAGS.tau, FLAGS.dim if FLAGS["dim"].present else None
        )
    except ValueError as e:
        if FLAGS.results_json or (FLAGS.k is not None and FLAGS.tau is not None):
            raise
        raise UsageError("the recogniser needs --k and --tau, or --results_json") from e
    extractor, spec = model_flags.build_extractor(model_flags.values())
    return builders.build_recognizer(
        extractor,
        spec,
        FLAGS.descriptor_dir,
        FLAGS.info_dir,
        k,
        tau,
        pca=FLAGS.pca,
        dim=dim,
        raw=FLAGS.raw,
        mini=FLAGS.mini,
        searcher=FLAGS.searcher,
        top_k=FLAGS.top_k,
        threshold=builders.threshold_settings(FLAGS.results_json, FLAGS.threshold, "--threshold"),
        scann_config=builders.scann_config(FLAGS.results_json) if approximate else None,
        rerank=builders.rerank_settings(FLAGS.results_json) if FLAGS.rerank != "none" else None,
        **_limits(),
    )


def _export_style():
    from tfmet.export import builders

    if not FLAGS.style_model:
        raise UsageError("the style export needs --style_model")
    return builders.build_style(
        FLAGS.style_model,
        FLAGS.image_size,
        top_k=FLAGS.top_k,
        trust_model=FLAGS.trust_model,
        **_limits(),
    )


def main(argv):
    no_arguments(argv)
    if not FLAGS.kind or not FLAGS.out:
        raise UsageError("--kind and --out are required")
    if FLAGS.kind == "style" and FLAGS["precision"].present:
        raise UsageError("--precision is for the descriptor and recognizer exports")
    model_flags.check_precision(model_flags.values())
    input_flags.check(_limits())
    check_outputs(folders=("out",))
    import tfmet
    from tfmet.export import metadata_signature, save_module
    from tfmet.export.common import check_export_dir

    check_export_dir(FLAGS.out, FLAGS.force)
    builders = {
        "descriptor": _export_descriptor,
        "recognizer": _export_recognizer,
        "style": _export_style,
    }
    module, described = builders[FLAGS.kind]()
    metadata = {"kind": FLAGS.kind, "tfmet_version": tfmet.__version__, **described}
    signatures = module.signatures()
    scalar = {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
    signatures["metadata"] = metadata_signature(scalar)
    path = save_module(module, FLAGS.out, signatures, metadata, force=FLAGS.force)
    print(f"exported {FLAGS.kind} SavedModel to {path} (signatures: {', '.join(signatures)})")


def run():
    run_program("tfmet-export", main)


if __name__ == "__main__":
    run()
