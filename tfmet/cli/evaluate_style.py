"""tfmet-evaluate-style: top-1/3/5, per-class precision/recall and confusion matrices of a run.

    tfmet-evaluate-style --workdir runs/rasta_last_fc --split test --flip_bagging

Writes <workdir>/eval_<split>/ (or --output_dir): metrics.json, per_class_<attribute>.csv,
confusion_<attribute>.csv and .png, and with --outliers_k K outliers_<attribute>.csv (images
ranked by mean cosine distance to their K nearest same-label neighbours).
"""

import sys

from absl import app, flags, logging

import tfmet.cli  # noqa: F401  (quiet TensorFlow start-up)

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by tfmet-train-style.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
_FLIP = flags.DEFINE_bool("flip_bagging", True, "Average predictions with the mirror image.")
_MODEL = flags.DEFINE_string("model", None, "Model file (default: <workdir>/classifier.keras).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Output directory (default <workdir>/eval_X).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Feature cache root (default: the run's).")
_OUTLIERS_K = flags.DEFINE_integer("outliers_k", 0, "Write outlier rankings with K neighbours.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_TRUST = flags.DEFINE_bool("trust_model", False, "Allow loading hub modules from the model file.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tfmet.training import style_run

    logging.set_verbosity(logging.INFO)
    try:
        reports = style_run.evaluate(
            _WORKDIR.value,
            split=_SPLIT.value,
            flip_bagging=_FLIP.value,
            output_dir=_OUTPUT.value,
            model_path=_MODEL.value,
            cache_dir=_CACHE.value,
            outliers_k=_OUTLIERS_K.value,
            batch_size=_BATCH.value,
            trust_model=_TRUST.value,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"tfmet-evaluate-style: error: {e}", file=sys.stderr)
        return 2
    for attribute, report in reports.items():
        line = " ".join(f"top-{k} {report[f'top{k}']:.4f}" for k in (1, 3, 5))
        print(f"{_SPLIT.value} {attribute} ({report['count']} images): {line}")
        if "flip_bagged" in report:
            bagged = report["flip_bagged"]
            line = " ".join(f"top-{k} {bagged[f'top{k}']:.4f}" for k in (1, 3, 5))
            print(f"{_SPLIT.value} {attribute} flip-bagged: {line}")
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
