"""Runs a smoke training on one device and on 2 logical CPU devices (MirroredStrategy).

    python -m tests.training.two_devices contrastive|style DIR

The logical devices must be configured before TensorFlow initialises its devices, so this runs
in a fresh process (tests/training/test_distribute.py starts it). It writes DIR/<name>.npz
(the trained weights, w00000, ...) and DIR/<name>.json (what the test compares) for
name = default, mirrored.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def _write(directory, name, weights, record):
    with open(os.path.join(directory, f"{name}.npz"), "wb") as f:
        np.savez(f, **{f"w{i:05d}": np.asarray(w) for i, w in enumerate(weights)})
    with open(os.path.join(directory, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


def contrastive(directory):
    """1 epoch of the smoke config with 3 pairs a batch (16 pairs: the last sub-batch has one
    pair, so one replica gets none); the mirrored run stops after one step and resumes."""
    import keras

    from configs import met_contrastive_r18
    from tests.kit.met_tree import write_met_tree
    from tfmet.training.contrastive import loop
    from tfmet.training.distribute import make_strategy

    tree = write_met_tree(os.path.join(directory, "met"))
    for name in ("default", "mirrored"):
        workdir = os.path.join(directory, f"run_{name}")
        config = met_contrastive_r18.get_config("smoke")
        config.update(epochs=1, batch_size=3, strategy=name)
        if name == "mirrored":
            config.stop_at_step = 1
            first = loop.train(config, tree.info_dir, tree.image_root, workdir)
            assert not first.finished and first.global_step == 1, first
            config.stop_at_step = None
        result = loop.train(config, tree.info_dir, tree.image_root, workdir, resume=True)
        model = keras.saving.load_model(result.model_path)
        epoch = result.history[-1]
        record = {
            "replicas": make_strategy(name).num_replicas_in_sync,
            "global_step": result.global_step,
            "loss": epoch["loss"],
            "val_gap": epoch["val_gap"],
            "val_acc": epoch["val_acc"],
        }
        _write(directory, name, [v.numpy() for v in model.weights], record)


def style(directory):
    """2 epochs of the finetune smoke config (top block trainable), 7 images a batch: every
    batch splits unevenly (4 + 3), the last one of an epoch too. Both runs stop after epoch 1
    and resume (a resumed run reshuffles from the seed, so it is compared with a resumed one)."""
    from configs import pandora18k
    from tests.kit.style_data import make_small_pandora18k
    from tfmet.training.style import checkpoints, run

    root = make_small_pandora18k(os.path.join(directory, "data"))
    for name in ("default", "mirrored"):
        config = pandora18k.get_config("smoke")
        config.dataset.root = root
        config.dataset.split_fractions = (0.5, 0.3, 0.2)
        config.cache_dir = os.path.join(directory, "cache")
        config.train.update(epochs=1, batch_size=7, patience=0, trainable_blocks=1, strategy=name)
        workdir = os.path.join(directory, f"run_{name}")
        run.train(config, workdir)
        config.train.epochs = 2  # resumed: weights, optimizer state and epoch from checkpoints/
        summary = run.train(config, workdir, resume=True)
        state = checkpoints.read_state(workdir)
        with np.load(checkpoints.checkpoint_paths(workdir)["last"]) as data:
            weights = [data[k] for k in sorted(data.files) if k.startswith("w")]
        record = {
            "best_epoch": summary["best_epoch"],
            "history": [
                {k: v for k, v in entry.items() if "/top" in k or k.startswith("val/")}
                for entry in state["history"]
            ],
        }
        _write(directory, name, weights, record)


if __name__ == "__main__":
    {"contrastive": contrastive, "style": style}[sys.argv[1]](sys.argv[2])
