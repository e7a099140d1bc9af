"""tfmet-train-style: train a style classifier from an ml_collections config.

    tfmet-train-style --config configs/pandora18k.py:smoke \
        --config.dataset.root /tmp/pandora_smoke --workdir /tmp/pandora_smoke_run

`--trainable_blocks N` / `--trainable_fraction f` override the config's `train` section;
`--resume` continues the checkpoint in --workdir. `--strategy mirrored` trains on every local GPU,
`--strategy multi_worker` on the machines TF_CONFIG names (the same command on each);
`train.batch_size` stays the global batch. See docs/style.md.
"""

from absl import flags, logging
from ml_collections import config_flags

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import check_outputs, check_strategy, no_arguments, require, run_program
from tfmet.cli.settings import Setting
from tfmet.training.style.config import check_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
# fmt: off
TRAIN_STYLE = (
    Setting("workdir", None, str, "Run directory (checkpoints, logs, model)."),
    Setting("resume", False, bool, "Continue the checkpoint in --workdir."),
    Setting("trainable_blocks", None, int,
            "Unfreeze the top N backbone blocks (overrides the config)."),
    Setting("trainable_fraction", None, float,
            "Unfreeze the top fraction of backbone layers (overrides config)."),
    Setting("strategy", None, str,
            "tf.distribute strategy: default (one device), mirrored (every local GPU) or "
            "multi_worker (the machines TF_CONFIG names); overrides config.train.strategy."),
)
# fmt: on
settings_lib.define_flags(TRAIN_STYLE, __name__)


def main(argv):
    no_arguments(argv)
    require(FLAGS.flag_values_dict(), "config", "workdir")
    check_outputs(folders=("workdir",))
    config = FLAGS.config
    train = config.get("train") or {}  # a config without it is refused by the library
    check_strategy(FLAGS.strategy or train.get("strategy", "default"))
    if FLAGS.strategy is not None and "train" in config:
        config.train.strategy = FLAGS.strategy
    if FLAGS.trainable_blocks is not None:
        config.train.trainable_blocks = FLAGS.trainable_blocks
    if FLAGS.trainable_fraction is not None:
        config.train.trainable_fraction = FLAGS.trainable_fraction
    check_config(config)  # a bad config is refused before TensorFlow loads (train checks it too)
    from tfmet.training.style import run as style_run

    logging.set_verbosity(logging.INFO)
    summary = style_run.train(config, FLAGS.workdir, resume=FLAGS.resume)
    print(
        f"{summary['mode']}: best val top-1 {summary['best_val_top1']:.4f} at epoch "
        f"{summary['best_epoch']} of {summary['epochs_run']}"
        f"{' (stopped early)' if summary['stopped_early'] else ''}, "
        f"{summary['bad_images']} unreadable image(s), {summary['seconds']:.1f} s; "
        f"model: {FLAGS.workdir}/classifier.keras"
    )


def run():
    run_program("tfmet-train-style", main)


if __name__ == "__main__":
    run()
