"""tfmet-evaluate-style: top-1/3/5, per-class precision/recall and confusion matrices of a run.

    tfmet-evaluate-style --workdir runs/rasta_last_fc --split test --flip_bagging

Writes <workdir>/eval_<split>/ (or --output_dir): metrics.json, per_class_<attribute>.csv,
confusion_<attribute>.csv and .png, and with --outliers_k K outliers_<attribute>.csv (images
ranked by mean cosine distance to their K nearest same-label neighbours).
"""

from absl import flags, logging

from tfmet.cli.common import check_outputs, no_arguments, require, run_program

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory written by tfmet-train-style.")
flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
flags.DEFINE_bool("flip_bagging", True, "Average predictions with the mirror image.")
flags.DEFINE_string("model", None, "Model file (default: <workdir>/classifier.keras).")
flags.DEFINE_string("output_dir", None, "Output directory (default <workdir>/eval_X).")
flags.DEFINE_string("cache_dir", None, "Feature cache root (default: the run's).")
flags.DEFINE_integer("outliers_k", 0, "Write outlier rankings with K neighbours.")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
flags.DEFINE_bool("trust_model", False, "Allow loading hub modules from the model file.")


def main(argv):
    no_arguments(argv)
    require(FLAGS.flag_values_dict(), "workdir")
    check_outputs(folders=("output_dir",))
    from tfmet.training.style import trained_run

    logging.set_verbosity(logging.INFO)
    reports = trained_run.evaluate(
        FLAGS.workdir,
        split=FLAGS.split,
        flip_bagging=FLAGS.flip_bagging,
        output_dir=FLAGS.output_dir,
        model_path=FLAGS.model,
        cache_dir=FLAGS.cache_dir,
        outliers_k=FLAGS.outliers_k,
        batch_size=FLAGS.batch_size,
        trust_model=FLAGS.trust_model,
    )
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
