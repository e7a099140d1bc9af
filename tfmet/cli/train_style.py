"""tfmet-train-style: train a style classifier from an ml_collections config.

    tfmet-train-style --config configs/pandora18k.py:smoke \
        --config.dataset.root /tmp/pandora_smoke --workdir /tmp/pandora_smoke_run

`--trainable_blocks N` / `--trainable_fraction f` override the config's `train` section;
`--resume` continues the checkpoint in --workdir. See docs/style.md.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

import tfmet.cli  # noqa: F401  (quiet TensorFlow start-up)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, model).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the checkpoint in --workdir.")
_TRAINABLE_BLOCKS = flags.DEFINE_integer(
    "trainable_blocks", None, "Unfreeze the top N backbone blocks (overrides the config)."
)
_TRAINABLE_FRACTION = flags.DEFINE_float(
    "trainable_fraction", None, "Unfreeze the top fraction of backbone layers (overrides config)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tfmet.training import style_run

    config = _CONFIG.value
    if _TRAINABLE_BLOCKS.value is not None:
        config.train.trainable_blocks = _TRAINABLE_BLOCKS.value
    if _TRAINABLE_FRACTION.value is not None:
        config.train.trainable_fraction = _TRAINABLE_FRACTION.value
    logging.set_verbosity(logging.INFO)
    try:
        summary = style_run.train(config, _WORKDIR.value, resume=_RESUME.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"tfmet-train-style: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{summary['mode']}: best val top-1 {summary['best_val_top1']:.4f} at epoch "
        f"{summary['best_epoch']} of {summary['epochs_run']}"
        f"{' (stopped early)' if summary['stopped_early'] else ''}, "
        f"{summary['bad_images']} unreadable image(s), {summary['seconds']:.1f} s; "
        f"model: {_WORKDIR.value}/classifier.keras"
    )
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
