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
--workdir. Settings can come from a config file (`--config=demo.py`, whose get_config() returns
a ConfigDict of some of them, e.g. backbone, weights and pca_dim); flags given on the command line
override it (settings: the demo's defaults <- the config file and its `--config.<key>=<value>` <-
flags given). See docs/demo.md.
"""

from absl import flags
from ml_collections import config_flags

from tfmet.cli import model_flags
from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, check_outputs, no_arguments, run_program
from tfmet.cli.settings import Setting

# The model flags (--backbone, --weights, --seed, --multiscale, --max_side, --precision) are
# model_flags', with the demo's defaults (DEFAULTS); --weights also takes 'random' (the seeded
# random initialisation), and --seed also seeds the benchmark.
DEFAULTS = {"backbone": "efficientnet_lite0", "weights": "imagenet"}
# model_flags' flags the demo has no use for: it builds its model from --backbone and --weights.
UNUSED = ("model", "resize_method")
MODEL = tuple(s for s in settings_lib.MODEL if s.name not in UNUSED)

# tfmet-demo's own settings (with MODEL: what its --config may set).
# fmt: off
DEMO = (
    Setting("workdir", None, str, "Folder for the benchmark, descriptors, logs and pictures."),
    Setting("random_baseline", False, bool, "Also run with random weights and print both results."),
    Setting("info_dir", None, str, "Your Met ground-truth folder (with --image_root)."),
    Setting("image_root", None, str, "Folder whose images/ holds your Met images."),
    Setting("pca_dim", None, int,
            "PCA-whitening dimension; 0 for raw descriptors. Default: 512 for databases of >= 2048 "
            "images with larger descriptors, else raw."),
    Setting("examples", 8, int, "Queries drawn in the matches picture."),
    Setting("progress", True, bool, "Show progress bars."),
)
# fmt: on
settings_lib.define_flags(DEMO, __name__)
config_flags.DEFINE_config_file("config", None, settings_lib.config_help("e.g. backbone, pca_dim"))

FLAGS = flags.FLAGS
PROGRAM = "tfmet-demo"


def settings():
    """The run's settings: the demo's defaults, then the config file's, then the flags given."""
    defaults = settings_lib.config(MODEL, DEMO)
    defaults.update(DEFAULTS)
    values = settings_lib.resolve(defaults, FLAGS.config, PROGRAM)
    settings_lib.check(values, MODEL, DEMO)
    return values


def main(argv):
    no_arguments(argv)
    values = settings()
    if not values["workdir"]:
        raise UsageError("--workdir is required")
    for name in UNUSED:
        if FLAGS[name].present:
            raise UsageError(f"--{name}: tfmet-demo builds its model from --backbone and --weights")
    check_outputs(folders=("workdir",), values=values)
    model_flags.check_precision(values)
    from tfmet.demo import figures
    from tfmet.demo.run import RANDOM, run_demo, write_serve_script

    runs = [values["weights"]]
    if values["random_baseline"] and values["weights"] != RANDOM:
        runs.append(RANDOM)
    own = ("random_baseline", "workdir")  # the others are run_demo's keywords
    options = {k: v for k, v in values.items() if k not in own and k != "weights"}
    results = [run_demo(values["workdir"], weights=weights, **options) for weights in runs]
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
    script = write_serve_script(values["workdir"], results[0])
    print(f"(or: make serve, which runs {script})")


def run():
    run_program(PROGRAM, main, defaults=DEFAULTS)


if __name__ == "__main__":
    run()
