"""tfmet-knn-eval: kNN classification of Met descriptors, tuned and scored by GAP.

    tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR --autotune [--mini] [-d 512] [--raw]
        [--val_eval] [--backend exact|scann] [--log NAME] [--results_json PATH]
    tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR -k 15 -t 50
    tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR --autotune --rerank=spatial [--rerank_top 20]

DESCRIPTOR_DIR holds tfmet descriptor stores or the reference's descriptors.pkl. The flags mirror
the reference's knn_eval.py; unlike its current version, --autotune without -k sweeps the whole
(k, tau) grid. Outputs (in --output_dir, default DESCRIPTOR_DIR): log_knn[_NAME].txt (appended),
knn_results[_NAME].json, knn_predictions[_NAME].npz and TensorBoard summaries under
tensorboard/knn_eval[_NAME]. The operating threshold ("not in the collection" below it) is chosen
on val (max F1, or --target_precision P) and its precision-recall curve is written beside the
results file as knn_threshold[_NAME].png; see docs/recognize.md. --rerank=spatial reports the
decision re-ranked by spatial verification beside the global one (docs/recognition.md).
"""

import datetime
import os

from absl import flags, logging

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, check_outputs, guarded, run_program
from tfmet.cli.settings import Setting
from tfmet.retrieval import SEARCHERS
from tfmet.retrieval.recall import DEFAULT_MIN_RECALL

FLAGS = flags.FLAGS
# One flag per setting (the reference's knn_eval.py flags, and tfmet's).
# fmt: off
KNN_EVAL = (
    settings_lib.INFO_DIR,
    settings_lib.MINI,
    Setting("dim", 512, int, "Dimension after PCA-whitening.", short_name="d"),
    Setting("k", None, int, "Neighbours; with --autotune, restricts the grid to this k."),
    Setting("t", None, float, "Softmax inverse temperature tau; with --autotune, fixes tau."),
    Setting("autotune", False, bool, "Choose k and tau by val GAP over the reference's grid."),
    Setting("val_eval", False, bool, "Evaluate the final classifier on val instead of test."),
    Setting("raw", False, bool, "Use the raw descriptors (no PCA-whitening)."),
    Setting("log", None, str, "Suffix of the log and output files (log_knn_<log>.txt)."),
    Setting("backend", "exact", tuple(SEARCHERS),
            "Search: exact brute force or ScaNN approximate."),
    Setting("results_json", None, str, "Results JSON path (default in --output_dir)."),
    Setting("min_recall", DEFAULT_MIN_RECALL, float,
            "--backend scann: recall@k against exact search to reach on val."),
    Setting("target_precision", None, float,
            "Operating threshold: the lowest whose val precision reaches this (default: max val "
            "F1)."),
    Setting("rerank", "none", ("none", "spatial"),
            "spatial: also report the decision re-ranked by spatial verification (local features "
            "extracted with tfmet-extract --local_features)."),
    Setting("rerank_top", 20, int, "--rerank: global neighbours verified per query (M)."),
    Setting("output_dir", None, str, "Where outputs go (default: DESCRIPTOR_DIR)."),
)
# fmt: on
settings_lib.define_flags(KNN_EVAL, __name__)
# The flags that are `tfmet.retrieval.evaluation.knn_eval`'s keywords of the same name.
KNN_EVAL_KEYWORDS = tuple("dim raw k autotune val_eval target_precision".split())


def experiment_name():
    """The reference's experiment tag, e.g. EXP_d512AT_val_eval."""
    name = f"EXP_d{FLAGS.dim}" + ("AT" if FLAGS.autotune else f"k{FLAGS.k}p{FLAGS.t}")
    return name + ("_val_eval" if FLAGS.val_eval else "")


def output_paths(output_dir):
    suffix = f"_{FLAGS.log}" if FLAGS.log else ""
    results = FLAGS.results_json or os.path.join(output_dir, f"knn_results{suffix}.json")
    return {
        "log": os.path.join(output_dir, f"log_knn{suffix}.txt"),
        "results": results,
        "threshold_png": os.path.join(os.path.dirname(results), f"knn_threshold{suffix}.png"),
        "predictions": os.path.join(output_dir, f"knn_predictions{suffix}.npz"),
        "tensorboard": os.path.join(output_dir, "tensorboard", f"knn_eval{suffix}"),
    }


def _main(argv):
    from tfmet.retrieval import evaluation, report
    from tfmet.retrieval.knn import KnnSearch
    from tfmet.retrieval.rerank import SpatialRerank

    if len(argv) != 2:
        raise UsageError(f"expected one DESCRIPTOR_DIR argument, got {len(argv) - 1}: {argv[1:]}")
    if not FLAGS.info_dir:
        raise UsageError("--info_dir is required")
    if FLAGS.target_precision is not None and not 0.0 < FLAGS.target_precision <= 1.0:
        raise UsageError(f"--target_precision must be in (0, 1], got {FLAGS.target_precision}")
    if FLAGS.rerank_top < 1:
        raise UsageError(f"--rerank_top must be a positive integer, got {FLAGS.rerank_top}")
    directory = argv[1]
    check_outputs(folders=("output_dir",), files=("results_json",))
    paths = output_paths(FLAGS.output_dir or directory)
    lines = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), f"expname: {experiment_name()}"]
    lines.append(f"dir: {directory}  backend: {FLAGS.backend}")

    def log(line):
        logging.info(line)
        lines.append(line)

    data = evaluation.load_met_descriptors(directory, FLAGS.info_dir, FLAGS.mini, evaluation.SPLITS)
    rerank = None
    if FLAGS.rerank == "spatial":
        rerank = SpatialRerank(evaluation.load_local_features(directory), top=FLAGS.rerank_top)
    search = KnnSearch(FLAGS.backend, min_recall=FLAGS.min_recall)
    options = {name: FLAGS[name].value for name in KNN_EVAL_KEYWORDS}
    result = evaluation.knn_eval(
        data, tau=FLAGS.t, search=search, log=log, rerank=rerank, **options
    )
    log(f"best parameters are : k={result.k} t={result.tau}")
    log("timings (s): " + ", ".join(f"{n} {t:.2f}" for n, t in result.timings_s.items()))
    report.write_outputs(
        paths, result, lines, name=f"knn_eval{'_' + FLAGS.log if FLAGS.log else ''}"
    )
    name = "val" if FLAGS.val_eval else "test"
    final = result.val if FLAGS.val_eval else result.test
    print(
        f"{name}: GAP {final['gap']:.4f}, GAP- {final['gap_minus']:.4f}, ACC {final['acc']:.4f} "
        f"(k={result.k}, t={result.tau}); results in {paths['results']}"
    )
    if result.rerank is not None:
        verified = result.rerank[name]
        print(
            f"{name} re-ranked (spatial, top {FLAGS.rerank_top}): GAP {verified['gap']:.4f}, "
            f"GAP- {verified['gap_minus']:.4f}, ACC {verified['acc']:.4f}"
        )


# The program's main: bad input leaves as one line and exit status 2 (tfmet.cli.common).
main = guarded("tfmet-knn-eval", _main)


def run():
    run_program("tfmet-knn-eval", _main)


if __name__ == "__main__":
    run()
