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
bytes; both are recorded in the export's metadata. Settings can also come from a config file
(`--config=export.py`: a ConfigDict of some of them), which the flags given override.
"""

from absl import flags
from ml_collections import config_flags

from tfmet.cli import (
    input_flags,  # --max_pixels, --max_bytes
    model_flags,  # the descriptor model, as tfmet-extract
)
from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, check_outputs, no_arguments, run_program
from tfmet.cli.settings import Setting
from tfmet.retrieval import SEARCHERS

FLAGS = flags.FLAGS
PROGRAM = "tfmet-export"

# tfmet-export's own settings (with model_flags' and input_flags': what its --config may set).
# fmt: off
EXPORT = (
    Setting("kind", None, ("descriptor", "style", "recognizer"), "What to export."),
    Setting("out", None, str, "Export directory (must not exist or be empty, unless --force)."),
    Setting("force", False, bool, "Overwrite an existing export directory."),
    # PCA-whitening.
    Setting("pca", None, str, "PCA-whitening .npz (tfmet.retrieval.PCAWhitening.save)."),
    Setting("dim", 512, int, "With --descriptor_dir and no --pca: fit PCAw to this dim."),
    Setting("raw", False, bool, "No PCA-whitening."),
    # Recogniser database and classifier.
    Setting("descriptor_dir", None, str, "tfmet-extract output with the train store."),
    settings_lib.INFO_DIR,  # the database's labels
    settings_lib.MINI,
    Setting("k", None, int, "kNN neighbours (default: from --results_json)."),
    Setting("tau", None, float, "Softmax inverse temperature (default: from --results_json)."),
    Setting("results_json", None, str, "tfmet-knn-eval results.json with the tuned k, t, dim."),
    Setting("threshold", None, float,
            "Operating threshold (default: from --results_json, else accept all)."),
    Setting("searcher", "exact", tuple(SEARCHERS),
            "Recogniser neighbour search (tfmet.retrieval.SEARCHERS)."),
    Setting("rerank", "none", ("none", "spatial"),
            "Recogniser: serve spatial re-ranking as tuned by tfmet-knn-eval --rerank=spatial (its "
            "--results_json; the train store's local features go into the export)."),
    Setting("top_k", 5, int, "Candidates returned per image (recogniser and style)."),
    # Style classifier.
    Setting("style_model", None, str, "tfmet-train-style run directory or .keras file."),
    Setting("image_size", None, int, "Style input size (default: the run's)."),
    Setting("trust_model", False, bool, "Allow loading hub modules (SavedModel programs)."),
)
# fmt: on
settings_lib.define_flags(EXPORT, __name__)
config_flags.DEFINE_config_file("config", None, settings_lib.config_help("e.g. kind, k, tau"))


def defaults():
    """tfmet-export's settings with their defaults (what its --config may set)."""
    return settings_lib.config(settings_lib.MODEL, settings_lib.INPUT, EXPORT)


def _limits(values):
    """--max_pixels and --max_bytes: what the export's serving signature refuses to decode."""
    return {name: values[name] for name in input_flags.NAMES}


def _export_descriptor(values, _):
    from tfmet.export import builders

    extractor, spec = model_flags.build_extractor(values)
    return builders.build_descriptor(
        extractor, spec, pca=None if values["raw"] else values["pca"], **_limits(values)
    )


def _classifier(values, dim_given):
    """k, tau and the PCA dimension: given, or from --results_json."""
    from tfmet.export import builders

    return builders.classifier_settings(
        values["results_json"], values["k"], values["tau"], values["dim"] if dim_given else None
    )


def _export_recognizer(values, dim_given):
    from tfmet.export import builders

    results = values["results_json"]
    k, tau, dim = _classifier(values, dim_given)
    extractor, spec = model_flags.build_extractor(values)
    approximate = SEARCHERS[values["searcher"]].approximate
    return builders.build_recognizer(
        extractor,
        spec,
        values["descriptor_dir"],
        values["info_dir"],
        k,
        tau,
        pca=values["pca"],
        dim=dim,
        raw=values["raw"],
        mini=values["mini"],
        searcher=values["searcher"],
        top_k=values["top_k"],
        threshold=builders.threshold_settings(results, values["threshold"], "--threshold"),
        scann_config=builders.scann_config(results) if approximate else None,
        rerank=builders.rerank_settings(results) if values["rerank"] != "none" else None,
        **_limits(values),
    )


def _export_style(values, _):
    from tfmet.export import builders

    return builders.build_style(
        values["style_model"],
        values["image_size"],
        top_k=values["top_k"],
        trust_model=values["trust_model"],
        **_limits(values),
    )


def _check_kind_inputs(kind, values):
    """What each kind needs, refused before TensorFlow loads."""
    if kind == "recognizer":
        if not values["descriptor_dir"] or not values["info_dir"]:
            raise UsageError("the recogniser needs --descriptor_dir and --info_dir")
        if not values["results_json"] and (values["k"] is None or values["tau"] is None):
            raise UsageError("the recogniser needs --k and --tau, or --results_json")
    if kind == "style" and not values["style_model"]:
        raise UsageError("the style export needs --style_model")


def main(argv):
    no_arguments(argv)
    default = defaults()
    values = settings_lib.resolve(default, FLAGS.config, PROGRAM)
    settings_lib.check(values, settings_lib.MODEL, settings_lib.INPUT, EXPORT)
    kind, out = values["kind"], values["out"]
    if not kind or not out:
        raise UsageError("--kind and --out are required")
    if kind == "style" and settings_lib.given("precision", default, FLAGS.config):
        raise UsageError("--precision is for the descriptor and recognizer exports")
    model_flags.check_precision(values)
    input_flags.check(values)
    check_outputs(folders=("out",), values=values)
    _check_kind_inputs(kind, values)
    import tfmet
    from tfmet.export import metadata_signature, save_module
    from tfmet.export.common import check_export_dir

    check_export_dir(out, values["force"])
    builders = {
        "descriptor": _export_descriptor,
        "recognizer": _export_recognizer,
        "style": _export_style,
    }
    module, described = builders[kind](values, settings_lib.given("dim", default, FLAGS.config))
    metadata = {"kind": kind, "tfmet_version": tfmet.__version__, **described}
    signatures = module.signatures()
    scalar = {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
    signatures["metadata"] = metadata_signature(scalar)
    path = save_module(module, out, signatures, metadata, force=values["force"])
    print(f"exported {kind} SavedModel to {path} (signatures: {', '.join(signatures)})")


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
