"""The run directory of contrastive training: files, checkpointed state, config record, stores."""

import dataclasses
import json
import os

import tensorflow as tf

from tfmet.data import descriptor_store as store_lib
from tfmet.descriptors import extraction
from tfmet.descriptors import spec as spec_lib
from tfmet.io.atomic import clean_stale_temporaries, save_json
from tfmet.training import rundir

CONFIG_FILE = "config.json"


HISTORY_FILE = "history.json"


CHECKPOINT_DIR = "checkpoints"


DESCRIPTOR_DIR = "descriptors"


TENSORBOARD_DIR = "tensorboard"


MODEL_DIR = "model"


MODEL_FILE = "embedder.keras"


BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"


# Config entries that may change between a run and its resumption (they do not change what
# is computed, or only extend it).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "stop_at_step",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "num_parallel_calls",
        "extract_batch_images",
        "progress",
        "keep_all_descriptors",
        "strategy",
        "bsize",  # recorded (as batch_size's twin) by runs from before it was removed
    }
)


@dataclasses.dataclass
class TrainResult:
    """What `train` did.

    Attributes:
      workdir: the run's folder.
      epochs_completed: epochs trained and validated so far.
      global_step: optimizer steps taken so far.
      finished: every epoch is done and the final model is written.
      history: one dict per completed epoch (loss, lr, GeM p, validation metrics, pairs).
      model_path: the final `.keras` Embedder (None until finished).
      backbone_weights_path: the final backbone `.weights.h5` (None until finished).
    """

    workdir: str
    epochs_completed: int
    global_step: int
    finished: bool
    history: list
    model_path: str | None = None
    backbone_weights_path: str | None = None


# The checkpointed progress counters: checkpoint key (= attribute) -> (dtype, variable name).
COUNTERS = {
    "epoch": (tf.int64, "epoch"),
    "step_in_epoch": (tf.int64, "step"),
    "loss_sum": (tf.float64, "loss_sum"),
    "loss_pairs": (tf.float64, "loss_pairs"),
}


class _RunState:
    """The checkpointed state: model, optimizer, progress counters and the epoch loss sums."""

    def __init__(self, trainer, directory, keep):
        self.trainer = trainer
        for key, (dtype, name) in COUNTERS.items():
            setattr(self, key, tf.Variable(tf.zeros((), dtype), trainable=False, name=name))
        self.checkpoint = tf.train.Checkpoint(
            embedder=trainer.embedder,
            optimizer=trainer.optimizer,
            **{key: getattr(self, key) for key in COUNTERS},
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)
        self.saved_step = None

    @property
    def global_step(self):
        return int(self.trainer.optimizer.iterations.numpy())

    def restore(self):
        path = self.manager.latest_checkpoint
        if path is None:
            return None
        self.checkpoint.restore(path).assert_existing_objects_matched()
        self.saved_step = (self.global_step, int(self.epoch.numpy()))
        return path

    def save(self):
        """Saves unless this exact state (step, epoch) was the last one saved."""
        key = (self.global_step, int(self.epoch.numpy()))
        if key == self.saved_step:
            return self.manager.latest_checkpoint
        self.saved_step = key
        return self.manager.save(checkpoint_number=self.global_step)


def _prepare_workdir(workdir, record, resume):
    """Writes the run's config, or checks it against the recorded one on resumption."""
    os.makedirs(workdir, exist_ok=True)
    clean_stale_temporaries(workdir)  # what a killed run was writing
    path = os.path.join(workdir, CONFIG_FILE)
    has_checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR)) is not None
    if has_checkpoint and not resume:
        raise ValueError(
            f"{workdir} already holds checkpoints of a run; pass resume (--resume) to continue "
            "it, or use a new workdir"
        )
    if has_checkpoint:
        rundir.check_resume(path, rundir.config_record(record), RESUMABLE_CHANGES)
    save_json(path, rundir.config_record(record))
    return has_checkpoint


def _read_history(workdir):
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _descriptor_dir(workdir, epoch):
    return os.path.join(workdir, DESCRIPTOR_DIR, f"epoch_{epoch}")


def _extract(extractor, name, dim, split, files, paths, labels, source, output_dir, config):
    """Single-scale descriptors of one split into a store in `output_dir`; returns the store."""
    spec = spec_lib.ExtractionSpec(
        backbone=config["backbone"],
        weights=name,
        scales=(1.0,),
        resize_method="torch",
        max_side=config.get("max_side"),
        dim=dim,
        precision=config.get("precision", "float32"),
    )
    extraction.extract_split(
        extractor,
        spec,
        split,
        files,
        output_dir,
        paths=paths,
        labels=labels,
        source=source,
        batch_images=int(config["extract_batch_images"]),
        progress=bool(config["progress"]),
    )
    return store_lib.read_store(output_dir, split, mmap=False)
