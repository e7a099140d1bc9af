"""tfmet-evaluate-style: top-1/3/5, per-class precision/recall and confusion matrices of a run.

    tfmet-evaluate-style --workdir runs/rasta_last_fc --split test --flip_bagging

Writes <workdir>/eval_<split>/ (or --output_dir): metrics.json, per_class_<attribute>.csv,
confusion_<attribute>.csv and .png, and with --outliers_k K outliers_<attribute>.csv (images
ranked by mean cosine distance to their K nearest same-label neighbours).
"""

from absl import flags, logging

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import check_outputs, no_arguments, require, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS

# Passed by name to `tfmet.training.style.trained_run.evaluate` (--model is its model_path).
EVALUATE = (
    Setting("split", "test", ("train", "val", "test"), "Split to evaluate."),
    Setting("flip_bagging", True, bool, "Average predictions with the mirror image."),
    Setting("output_dir", None, str, "Output directory (default <workdir>/eval_X)."),
    Setting("cache_dir", None, str, "Feature cache root (default: the run's)."),
    Setting("outliers_k", 0, int, "Write outlier rankings with K neighbours."),
    Setting("batch_size", 32, int, "Images per forward pass."),
    Setting("trust_model", False, bool, "Allow loading hub modules from the model file."),
)
settings_lib.define_flags(
    (
        Setting("workdir", None, str, "Run directory written by tfmet-train-style."),
        Setting("model", None, str, "Model file (default: <workdir>/classifier.keras)."),
        *EVALUATE,
    ),
    __name__,
)


def main(argv):
    no_arguments(argv)
    require(FLAGS.flag_values_dict(), "workdir")
    check_outputs(folders=("output_dir",))
    from tfmet.training.style import trained_run

    logging.set_verbosity(logging.INFO)
    options = {name: FLAGS[name].value for name in settings_lib.names(EVALUATE)}
    reports = trained_run.evaluate(FLAGS.workdir, model_path=FLAGS.model, **options)
    for attribute, report in reports.items():
        line = " ".join(f"top-{k} {report[f'top{k}']:.4f}" for k in (1, 3, 5))
        print(f"{FLAGS.split} {attribute} ({report['count']} images): {line}")
        if "flip_bagged" in report:
            bagged = report["flip_bagged"]
            line = " ".join(f"top-{k} {bagged[f'top{k}']:.4f}" for k in (1, 3, 5))
            print(f"{FLAGS.split} {attribute} flip-bagged: {line}")


def run():
    run_program("tfmet-evaluate-style", main)


if __name__ == "__main__":
    run()
