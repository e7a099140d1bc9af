r"""tfmet-export: write a SavedModel for serving.

    tfmet-export --kind descriptor --backbone resnet18 --weights r18.weights.h5 --out exports/desc
    tfmet-export --kind recognizer --backbone resnet18 --weights r18.weights.h5 \
        --descriptor_dir descriptors/ --info_dir met/ --results_json knn/knn_results.json \
        --out exports/rec
    tfmet-export --kind style --style_model runs/pandora18k --out exports/style

The descriptor and recogniser exports take the model exactly as tfmet-extract does (--backbone +
--weights, or --model for a saved Embedder). The recogniser also needs the database: the train
descriptor store that tfmet-extract wrote (--descriptor_dir) with its labels (--info_dir), the
PCA-whitening (--pca, or fitted again on the train descriptors with --dim, as tfmet-knn-eval
does; --raw for none) and the tuned k and tau (--k/--tau, or --results_json from tfmet-knn-eval).
"""

from absl import app, flags, logging

from tfmet.cli import model_flags  # noqa: F401  (the descriptor model, as tfmet-extract)

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
flags.DEFINE_enum("searcher", "exact", ["exact", "scann"], "Recogniser neighbour search.")
flags.DEFINE_integer("top_k", 5, "Candidates returned per image (recogniser and style).")
# Style classifier.
flags.DEFINE_string("style_model", None, "tfmet-train-style run directory or .keras file.")
flags.DEFINE_integer("image_size", None, "Style input size (default: the run's).")
flags.DEFINE_bool("trust_model", False, "Allow loading hub modules (SavedModel programs).")


class UsageError(ValueError):
    """Bad command-line input."""


def _extractor():
    return model_flags.build_extractor(model_flags.values())


def _classifier_settings():
    k, tau, dim = FLAGS.k, FLAGS.tau, FLAGS.dim
    if FLAGS.results_json:
        from tfmet.io.json_files import read_json

        results = read_json(FLAGS.results_json, "tfmet-knn-eval results file")
        if not isinstance(results, dict) or "k" not in results or "t" not in results:
            raise ValueError(f"{FLAGS.results_json}: not a tfmet-knn-eval results file")
        k = results["k"] if k is None else k
        tau = results["t"] if tau is None else tau
        if not FLAGS["dim"].present and "dim" in results:
            dim = results["dim"]
    if k is None or tau is None:
        raise UsageError("the recogniser needs --k and --tau, or --results_json")
    return int(k), float(tau), dim


def _scann_config():
    """The ScaNN configuration tfmet-knn-eval chose by measured recall (from --results_json)."""
    if FLAGS.searcher != "scann" or not FLAGS.results_json:
        return None
    from tfmet.io.json_files import read_json

    search = read_json(FLAGS.results_json, "tfmet-knn-eval results file").get("search") or {}
    return search.get("config")


def _pca(train=None, dim=None):
    """(mean, projection) or (None, None)."""
    from tfmet.retrieval import PCAWhitening

    if FLAGS.raw or (dim is None and FLAGS.pca is None):
        return None, None
    if FLAGS.pca:
        pca = PCAWhitening.load(FLAGS.pca)
    elif train is not None:
        logging.info("fitting PCA-whitening (dim %d) on %d train descriptors", dim, len(train))
        pca = PCAWhitening(dim=dim).fit(train)
    else:
        return None, None
    return pca.mean, pca.projection


def export_descriptor(metadata):
    from tfmet.export import DescriptorModule

    extractor, spec = _extractor()
    mean, projection = _pca()
    module = DescriptorModule(
        extractor.embedder,
        scales=spec.scales,
        resize_method=spec.resize_method,
        pca_mean=mean,
        pca_projection=projection,
        max_side=spec.max_side,
    )
    metadata.update(spec.metadata(), dim=module.dim, pca_whitening=module.whitened)
    return module


def export_recognizer(metadata):
    import numpy as np

    from tfmet.data import met
    from tfmet.descriptors.store import read_store
    from tfmet.export import RecognizerModule
    from tfmet.retrieval import apply_pca_whitening

    if not FLAGS.descriptor_dir or not FLAGS.info_dir:
        raise UsageError("the recogniser needs --descriptor_dir and --info_dir")
    k, tau, dim = _classifier_settings()
    store = read_store(FLAGS.descriptor_dir, "train")
    labels = met.load_split(FLAGS.info_dir, "train", mini=FLAGS.mini).labels
    if labels.shape[0] != store.count:
        raise ValueError(
            f"{FLAGS.descriptor_dir}: train store has {store.count} rows, "
            f"{FLAGS.info_dir} lists {labels.shape[0]} database images"
        )
    train = np.asarray(store.descriptors[store.valid])
    labels = labels[store.valid]
    extractor, spec = _extractor()
    if store.manifest.get("weights_sha256") not in (None, spec.weights):
        raise ValueError(
            f"{FLAGS.descriptor_dir}: descriptors were made with weights "
            f"{store.manifest['weights_sha256']}, the model to export has {spec.weights}"
        )
    mean, projection = _pca(train, dim)
    database = train if projection is None else apply_pca_whitening(train, mean, projection)
    module = RecognizerModule(
        extractor.embedder,
        database,
        labels,
        k=k,
        tau=tau,
        searcher=FLAGS.searcher,
        scann_config=_scann_config(),
        top_k=FLAGS.top_k,
        scales=spec.scales,
        resize_method=spec.resize_method,
        pca_mean=mean,
        pca_projection=projection,
        max_side=spec.max_side,
    )
    metadata.update(
        spec.metadata(),
        k=module.k,
        tau=module.tau,
        dim=module.dim,
        pca_whitening=module.whitened,
        database_size=module.database_size,
        num_classes=module.num_classes,
        searcher=module.searcher,
        scann_config=None if module.scann_config is None else module.scann_config.to_dict(),
    )
    return module


def export_style(metadata):
    from tfmet.export.style import StyleModule
    from tfmet.training import style_run

    if not FLAGS.style_model:
        raise UsageError("the style export needs --style_model")
    classifier = style_run.load_classifier(FLAGS.style_model, trust_model=FLAGS.trust_model)
    image_size = FLAGS.image_size
    if image_size is None:
        run_dir = style_run.run_dir_of(FLAGS.style_model)
        image_size = style_run.read_run_config(run_dir)["model"]["image_size"]
    module = StyleModule(classifier, image_size, top_k=FLAGS.top_k)
    metadata.update(
        backbone=classifier.backbone_name or classifier.backbone.name,
        image_size=module.image_size,
        class_names=module.class_names,
    )
    return module


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tfmet
    from tfmet.export import metadata_signature, save_module

    try:
        if not FLAGS.kind or not FLAGS.out:
            raise UsageError("--kind and --out are required")
        from tfmet.export.common import check_export_dir

        check_export_dir(FLAGS.out, FLAGS.force)
        metadata = {"kind": FLAGS.kind, "tfmet_version": tfmet.__version__}
        builders = {
            "descriptor": export_descriptor,
            "recognizer": export_recognizer,
            "style": export_style,
        }
        module = builders[FLAGS.kind](metadata)
        signatures = module.signatures()
        scalar = {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool)}
        signatures["metadata"] = metadata_signature(scalar)
        path = save_module(module, FLAGS.out, signatures, metadata, force=FLAGS.force)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        tfmet.cli.fail("tfmet-export", e)
    print(f"exported {FLAGS.kind} SavedModel to {path} (signatures: {', '.join(signatures)})")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
