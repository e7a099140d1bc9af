"""tfmet-demo: recognise artworks end to end, in minutes, on real photos (or your Met folder).

    tfmet-demo --workdir demo_work                         # EfficientNet-Lite0, ImageNet weights
    tfmet-demo --workdir demo_work --weights random        # the same with random weights
    tfmet-demo --workdir demo_work --random_baseline       # both, side by side
    tfmet-demo --workdir w --info_dir MET/ground_truth --image_root MET   # your own Met folder
    tfmet-demo --workdir w --backbone resnet50 --weights r50.weights.h5  # converted weights

Builds a small benchmark in the official Met format from photos shipped with scikit-image,
scikit-learn and matplotlib (exhibits -> database; simulated visitor photos and distractors ->
queries), extracts multi-scale GeM descriptors, tunes the kNN classifier on val, prints test
GAP / GAP- / ACC, and writes TensorBoard logs and a PNG of queries with their top matches under
--workdir. See docs/demo.md.
"""

from absl import flags

from tfmet.cli import model_flags
from tfmet.cli.common import UsageError, check_outputs, no_arguments, run_program

# The model flags (--backbone, --weights, --seed, --multiscale, --max_side, --precision) are
# model_flags', with the demo's defaults (DEFAULTS); --weights also takes 'random' (the seeded
# random initialisation), and --seed also seeds the benchmark.
DEFAULTS = {"backbone": "efficientnet_lite0", "weights": "imagenet"}
# model_flags' flags the demo has no use for: it builds its model from --backbone and --weights.
UNUSED = ("model", "resize_method")

flags.DEFINE_string("workdir", None, "Folder for the benchmark, descriptors, logs and pictures.")
flags.DEFINE_bool("random_baseline", False, "Also run with random weights and print both results.")
flags.DEFINE_string("info_dir", None, "Your Met ground-truth folder (with --image_root).")
flags.DEFINE_string("image_root", None, "Folder whose images/ holds your Met images.")
flags.DEFINE_integer(
    "pca_dim",
    None,
    "PCA-whitening dimension; 0 for raw descriptors. Default: 512 for databases of >= 2048 "
    "images with larger descriptors, else raw.",
)
flags.DEFINE_integer("examples", 8, "Queries drawn in the matches picture.")
flags.DEFINE_bool("progress", True, "Show progress bars.")

FLAGS = flags.FLAGS
PROGRAM = "tfmet-demo"


def main(argv):
    no_arguments(argv)
    if not FLAGS.workdir:
        raise UsageError("--workdir is required")
    for name in UNUSED:
        if FLAGS[name].present:
            raise UsageError(f"--{name}: tfmet-demo builds its model from --backbone and --weights")
    check_outputs(folders=("workdir",))
    model_flags.check_precision(model_flags.values())
    from tfmet.demo import figures
    from tfmet.demo.run import RANDOM, run_demo, write_serve_script

    runs = [FLAGS.weights]
    if FLAGS.random_baseline and FLAGS.weights != RANDOM:
        runs.append(RANDOM)
    results = []
    for weights in runs:
        results.append(
            run_demo(
                FLAGS.workdir,
                backbone=FLAGS.backbone,
                weights=weights,
                info_dir=FLAGS.info_dir,
                image_root=FLAGS.image_root,
                seed=FLAGS.seed,
                multiscale=FLAGS.multiscale,
                max_side=FLAGS.max_side,
                pca_dim=FLAGS.pca_dim,
                examples=FLAGS.examples,
                progress=FLAGS.progress,
                precision=FLAGS.precision,
            )
        )
    print()
    print("Summary (test queries):")
    for result in results:
        print(
            f"  {result.run_name:40s} {figures.format_metrics(result.test)}  "
            f"(k={result.k}, tau={result.tau:g}; {result.seconds:.0f} s)"
        )
    print(figures.EXPLANATION)
    print("See the recogniser answer photos in a web page (tfmet-serve, then open the address):")
    print(results[0].serve_command)
    script = write_serve_script(FLAGS.workdir, results[0])
    print(f"(or: make serve, which runs {script})")


def run():
    run_program(PROGRAM, main, defaults=DEFAULTS)


if __name__ == "__main__":
    run()
