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
`--config.<key>=<value>`). See docs/contrastive.md.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

import tfmet.cli  # fail(); importing it silences TensorFlow's C++ start-up logs
from tfmet.training.mining import PAIR_TYPES

FLAGS = flags.FLAGS

flags.DEFINE_string("info_dir", None, "Folder with MET_database.json, valset.json, ...")
flags.DEFINE_string("image_root", None, "Folder whose images/ subfolder holds the Met images.")
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, TensorBoard, final model.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_string(
    "init_descr",
    None,
    "Initial single-scale database descriptors (a tfmet store folder or the reference's "
    "descriptors.pkl); extracted with the initial model when not given.",
)
config_flags.DEFINE_config_file(
    "config", None, "ml_collections training config (default: the reference's settings)."
)
# Settings mirrored from the reference; given explicitly they override the config.
flags.DEFINE_string("net", "resnet18", "Backbone registry name (tfmet.backbones.names()).")
flags.DEFINE_string("weights", None, "Backbone weights file (.weights.h5); none: random init.")
flags.DEFINE_enum("pairs_type", "sim_siam_pos+new_neg", PAIR_TYPES, "Pair type.")
flags.DEFINE_integer("epochs", 10, "Epochs (each database image is an anchor once per epoch).")
flags.DEFINE_integer("bsize", 64, "Pairs per batch.")
flags.DEFINE_integer("vbsizemul", 1, "Batches accumulated per optimizer step.")
flags.DEFINE_float("backbone_lr", 1e-7, "Adam learning rate.")
flags.DEFINE_float("wdecay", 1e-6, "L2 weight decay (added to the gradient, as torch Adam).")
flags.DEFINE_float("margin", 1.8, "Margin of the contrastive loss.")
flags.DEFINE_integer("imsize", 500, "Side of the square training crops.")
flags.DEFINE_integer("sched_step", 6, "Epochs between learning-rate decays.")
flags.DEFINE_float("sched_gamma", 0.1, "Learning-rate decay factor.")
flags.DEFINE_bool("emb_proj", False, "Add a projector (Dense d->d + L2) after GeM.")
flags.DEFINE_bool("pca", False, "Initialise the projector from PCA-whitening (needs --emb_proj).")
flags.DEFINE_bool("mini", False, "Train on mini_MET_database.json.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, mining, shuffling and augmentation.")
flags.DEFINE_bool("initeval", False, "Validate the initial model before training.")
flags.DEFINE_integer("stop_at_step", None, "Stop (checkpointed) after this many steps.")

OVERRIDES = (
    "net",
    "weights",
    "pairs_type",
    "epochs",
    "bsize",
    "vbsizemul",
    "backbone_lr",
    "wdecay",
    "margin",
    "imsize",
    "sched_step",
    "sched_gamma",
    "emb_proj",
    "pca",
    "mini",
    "seed",
    "initeval",
    "stop_at_step",
)


class UsageError(ValueError):
    """Bad command-line input."""


def training_config():
    """The config file's settings (or the reference defaults), overridden by explicit flags."""
    from tfmet.training.contrastive import default_config

    config = FLAGS.config if FLAGS.config is not None else default_config()
    for name in OVERRIDES:
        if FLAGS[name].present:
            config[name] = FLAGS[name].value
    if config.pca and not config.emb_proj:
        raise UsageError("--pca initialises the projector: add --emb_proj")
    return config


def _require(*names):
    missing = [f"--{name}" for name in names if not FLAGS[name].value]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")


def _check_folders():
    """Fails fast (before TensorFlow loads) on input folders that do not exist."""
    for name in ("info_dir", "image_root"):
        if not os.path.isdir(FLAGS[name].value):
            raise FileNotFoundError(f"--{name}={FLAGS[name].value}: no such folder")
    if FLAGS.init_descr is not None and not os.path.exists(FLAGS.init_descr):
        raise FileNotFoundError(f"--init_descr={FLAGS.init_descr}: no such file or folder")


def _report(result):
    for entry in result.history:
        if "loss" in entry:
            logging.info(
                "epoch %d: loss %.5f, val GAP %.2f, GAP- %.2f, ACC %.2f",
                entry["epoch"],
                entry["loss"],
                100 * entry["val_gap"],
                100 * entry["val_gap_minus"],
                100 * entry["val_acc"],
            )
    if result.finished:
        print(f"Trained model: {result.model_path}")
        print(f"Extract with: tfmet-extract --model={result.model_path} ...")
    else:
        print(
            f"Stopped at step {result.global_step} (epoch {result.epochs_completed} done); "
            "continue with the same command and --resume"
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        _require("info_dir", "image_root", "workdir")
        _check_folders()
        config = training_config()
        from tfmet.training import contrastive

        result = contrastive.train(
            config,
            FLAGS.info_dir,
            FLAGS.image_root,
            FLAGS.workdir,
            init_descr=FLAGS.init_descr,
            resume=FLAGS.resume,
        )
    except (UsageError, ValueError, FileNotFoundError) as e:
        tfmet.cli.fail("tfmet-train-contrastive", e)
    _report(result)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
