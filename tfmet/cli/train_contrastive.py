"""tfmet-train-contrastive: contrastive fine-tuning on mined Met pairs, resumable.

    tfmet-train-contrastive --config=configs/met_contrastive_r18.py \
        --info_dir=MET/ground_truth --image_root=MET --workdir=runs/r18 \
        --weights=weights/resnet18_swsl.weights.h5

Every epoch mines pairs from the previous epoch's descriptors, trains, validates (K=1, tau=1
kNN: GAP / GAP- / ACC), writes TensorBoard summaries (`tensorboard --logdir runs/r18`) and a
checkpoint. Kill it and run the same command with `--resume` to continue exactly where it
stopped. The final model is `<workdir>/model/embedder.keras`, for
`tfmet-extract --model=<workdir>/model/embedder.keras`. Flags mirror the reference's
train_contrastive.py; given on the command line they override the config (as does
`--config.<key>=<value>`). `--strategy=mirrored` trains on every local GPU,
`--strategy=multi_worker` on the machines TF_CONFIG names (the same command on each); the
batch size (`--config.batch_size=N`, its one name) stays the global one. See docs/contrastive.md.
"""

import os
import shlex

from absl import flags, logging
from ml_collections import config_flags

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import (
    UsageError,
    check_outputs,
    check_strategy,
    no_arguments,
    require,
    run_program,
)
from tfmet.cli.settings import Setting
from tfmet.training.contrastive.config import check_config, default_config
from tfmet.training.contrastive.mining import PAIR_TYPES

FLAGS = flags.FLAGS

# fmt: off
TRAIN_CONTRASTIVE = (
    *settings_lib.MET_FOLDERS,
    Setting("workdir", None, str, "Output folder: checkpoints, TensorBoard, final model."),
    Setting("resume", False, bool, "Continue from the latest checkpoint in --workdir."),
    Setting("init_descr", None, str,
            "Initial single-scale database descriptors (a tfmet store folder or the reference's "
            "descriptors.pkl); extracted with the initial model when not given."),
)
# fmt: on
settings_lib.define_flags(TRAIN_CONTRASTIVE, __name__)
config_flags.DEFINE_config_file(
    "config",
    None,
    "ml_collections training config, configs/*.py[:variant] (default: the reference's settings, "
    "tfmet.training.contrastive.config.default_config); override entries with "
    "--config.<key>=<value>.",
)
# The reference's train_contrastive.py flags, kept as aliases of config entries: given on the
# command line they set that entry (after the config file and its --config.* overrides). Their
# defaults are the config's: none is repeated here. {flag: (config entry, kind)}; the flags are
# generated from it.
ALIASES = {
    "net": ("backbone", str),
    "weights": ("weights", str),
    "pairs_type": ("pairs_type", tuple(PAIR_TYPES)),
    "epochs": ("epochs", int),
    "vbsizemul": ("vbsizemul", int),
    "backbone_lr": ("learning_rate", float),
    "wdecay": ("weight_decay", float),
    "margin": ("margin", float),
    "imsize": ("image_size", int),
    "sched_step": ("sched_step", int),
    "sched_gamma": ("sched_gamma", float),
    "emb_proj": ("emb_proj", bool),
    "pca": ("pca", bool),
    "mini": ("mini", bool),
    "seed": ("seed", int),
    "initeval": ("initeval", bool),
    "stop_at_step": ("stop_at_step", int),
    "strategy": ("strategy", str),
}
_HELP = "Alias of --config.{} (default: the config's)."
# What an alias's help says before _HELP, where it says more.
_ABOUT = {
    "strategy": "tf.distribute strategy: default (one device), mirrored (every local GPU) or "
    "multi_worker (the machines TF_CONFIG names). ",
}
settings_lib.define_flags(
    [
        Setting(flag, None, kind, _ABOUT.get(flag, "") + _HELP.format(key))
        for flag, (key, kind) in ALIASES.items()
    ],
    __name__,
)


def training_config():
    """The config file's settings (or the reference defaults), then the alias flags given."""
    config = FLAGS.config if FLAGS.config is not None else default_config()
    for flag, (key, _) in ALIASES.items():
        if FLAGS[flag].present:
            config[key] = FLAGS[flag].value
    if config.pca and not config.emb_proj:
        raise UsageError("--pca initialises the projector: add --emb_proj")
    check_strategy(config.get("strategy", "default"))
    return config


def _check_folders():
    """Fails fast (before TensorFlow loads) on input folders that do not exist."""
    for name in ("info_dir", "image_root"):
        if not os.path.isdir(FLAGS[name].value):
            raise FileNotFoundError(f"--{name}={FLAGS[name].value}: no such folder")
    if FLAGS.init_descr is not None and not os.path.exists(FLAGS.init_descr):
        raise FileNotFoundError(f"--init_descr={FLAGS.init_descr}: no such file or folder")


def extract_command(result, config):
    """The tfmet-extract line that describes this run's Met folder with the trained model
    (multi-scale, into `<workdir>/extracted`), capped as validation was (`max_side`)."""
    argv = [
        "tfmet-extract",
        f"--model={result.model_path}",
        f"--info_dir={FLAGS.info_dir}",
        f"--image_root={FLAGS.image_root}",
        f"--output_dir={os.path.join(FLAGS.workdir, 'extracted')}",
    ]
    if config.get("max_side"):
        argv.append(f"--max_side={config.max_side}")
    return shlex.join(argv)


def _report(result, config):
    for entry in result.history:
        if "loss" in entry:
            logging.info(
                "epoch %d: loss %.5f, val GAP %.4f, GAP- %.4f, ACC %.4f",
                entry["epoch"],
                entry["loss"],
                entry["val_gap"],
                entry["val_gap_minus"],
                entry["val_acc"],
            )
    if result.finished:
        print(f"Trained model: {result.model_path}")
        print(f"Extract with: {extract_command(result, config)}")
    else:
        print(
            f"Stopped at step {result.global_step} (epoch {result.epochs_completed} done); "
            "continue with the same command and --resume"
        )


def main(argv):
    no_arguments(argv)
    require(FLAGS.flag_values_dict(), "info_dir", "image_root", "workdir")
    _check_folders()
    check_outputs(folders=("workdir",))
    config = training_config()
    check_config(config)  # a bad config is refused before TensorFlow loads (train checks it too)
    from tfmet.training.contrastive.loop import train

    result = train(
        config,
        FLAGS.info_dir,
        FLAGS.image_root,
        FLAGS.workdir,
        init_descr=FLAGS.init_descr,
        resume=FLAGS.resume,
    )
    _report(result, config)


def run():
    run_program("tfmet-train-contrastive", main)


if __name__ == "__main__":
    run()
