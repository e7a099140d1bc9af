"""The per-epoch callback of style training (`StyleMonitor`) and the TensorBoard projector.

After every epoch the monitor:

- evaluates the validation split once (loss, top-1/3/5 per attribute);
- writes TensorBoard scalars under `<workdir>/tensorboard/{train,val}` (loss, `<attribute>/top1`
  ..., `learning_rate`) and a confusion-matrix image per attribute;
- saves the resumable checkpoint `<workdir>/checkpoints/` (`tfmet.training.style.checkpoints`;
  `best.weights.npz` is new when validation top-1 of the first attribute improves);
- stops training after `patience` epochs without improvement.

At the end it writes the validation features of the best epoch to the TensorBoard embedding
projector (`write_projector`: `<workdir>/tensorboard/projector_config.pbtxt`, labels and paths
as metadata).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.io.atomic import atomic_path
from tfmet.metrics.topk import top_k_accuracy
from tfmet.training.style.checkpoints import checkpoint_paths, write_checkpoint
from tfmet.training.style.evaluate import TOP_KS, confusion_image, confusion_matrix
from tfmet.training.style.model import MaskedSparseCrossEntropy, StyleHead

TENSORBOARD_DIR = "tensorboard"


def write_projector(logdir, features, metadata_header, metadata_rows, name="val_features"):
    """Validation features for TensorBoard's embedding projector, with a TSV of metadata."""
    from tensorboard.plugins import projector

    os.makedirs(logdir, exist_ok=True)
    metadata = "metadata.tsv"
    with atomic_path(os.path.join(logdir, metadata)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\t".join(metadata_header) + "\n")
            for row in metadata_rows:
                f.write("\t".join(str(v).replace("\t", " ") for v in row) + "\n")
    embedding = tf.Variable(np.asarray(features, np.float32), name=name)
    checkpoint = tf.train.Checkpoint(embedding=embedding)
    checkpoint.save(os.path.join(logdir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = metadata
    projector.visualize_embeddings(logdir, config)


class StyleMonitor(keras.callbacks.Callback):
    """Per-epoch validation, TensorBoard, checkpoints and early stopping (see the module doc).

    Args:
      workdir: run directory.
      evaluate: callable(model) -> (logits {attribute: [n, c]}, features [n, d]) on validation.
      val_labels: attribute -> int [n] validation labels.
      class_names: attribute -> names.
      patience: early-stopping patience (0 = never stop early).
      state: a state dict read from a checkpoint (resume), or None.
      projector_metadata: (header, rows) describing the validation rows, or None to skip.
    """

    def __init__(
        self,
        workdir,
        evaluate,
        val_labels,
        class_names,
        patience=5,
        state=None,
        projector_metadata=None,
        steps_per_epoch=None,
        batch_size=None,
        log_every_s=30.0,
    ):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.log_every_s = float(log_every_s)
        self._epoch_start = self._last_log = time.time()
        self.workdir = workdir
        self.evaluate = evaluate
        self.val_labels = {a: np.asarray(v) for a, v in val_labels.items()}
        self.class_names = class_names
        self.attributes = list(class_names)
        self.patience = int(patience)
        self.paths = checkpoint_paths(workdir)
        self.projector_metadata = projector_metadata
        self.state = dict(
            state
            or {
                "epoch": 0,
                "best_top1": -1.0,
                "best_epoch": 0,
                "wait": 0,
                "stopped_early": False,
                "history": [],
            }
        )
        logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self.logdir = logdir
        self.writers = {
            split: tf.summary.create_file_writer(os.path.join(logdir, split))
            for split in ("train", "val")
        }
        self.best_features = None
        self._wrote_names = False

    def _val_metrics(self, logits):
        metrics = {}
        total = 0.0
        for a in self.attributes:
            loss = float(MaskedSparseCrossEntropy()(self.val_labels[a], logits[a]))
            metrics[f"{a}/loss"] = loss
            total += loss
            for k in TOP_KS:
                metrics[f"{a}/top{k}"] = top_k_accuracy(logits[a], self.val_labels[a], k)
        metrics["loss"] = total
        return metrics

    def _train_metrics(self, logs):
        metrics = {"loss": float(logs.get("loss", float("nan")))}
        for a in self.attributes:
            for k in TOP_KS:
                for key in (f"{a}_top{k}", f"top{k}"):
                    if key in logs:
                        metrics[f"{a}/top{k}"] = float(logs[key])
                        break
            if f"{a}_loss" in logs:
                metrics[f"{a}/loss"] = float(logs[f"{a}_loss"])
        return metrics

    def _learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._last_log = time.time()

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        if now - self._last_log < self.log_every_s:
            return
        self._last_log = now
        steps = batch + 1
        rate = steps / max(now - self._epoch_start, 1e-9)
        total = self.steps_per_epoch or 0
        eta = f", epoch ETA {(total - steps) / rate:.0f} s" if total else ""
        images = f", {rate * self.batch_size:.1f} images/s" if self.batch_size else ""
        logging.info(
            "step %d%s: %.2f steps/s%s%s", steps, f"/{total}" if total else "", rate, images, eta
        )

    def _write_summaries(self, step, train, val, logits, learning_rate):
        """TensorBoard: train/val scalars, the learning rate, val confusion matrices."""
        with self.writers["train"].as_default(step=step):
            for name, value in train.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("learning_rate", learning_rate)
        with self.writers["val"].as_default(step=step):
            for name, value in val.items():
                tf.summary.scalar(name, value)
            for a in self.attributes:
                matrix = confusion_matrix(
                    self.val_labels[a], logits[a].argmax(axis=1), len(self.class_names[a])
                )
                tf.summary.image(f"{a}/confusion_matrix", confusion_image(matrix)[None])
                if not self._wrote_names:
                    names = "  \n".join(f"{i}: {n}" for i, n in enumerate(self.class_names[a]))
                    tf.summary.text(f"{a}/confusion_matrix_classes", names)
            self._wrote_names = True
        for writer in self.writers.values():
            writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logits, features = self.evaluate(self.model)
        logits = {a: np.asarray(v) for a, v in logits.items()}
        val = self._val_metrics(logits)
        train = self._train_metrics(logs)
        step = epoch + 1
        learning_rate = self._learning_rate()
        self._write_summaries(step, train, val, logits, learning_rate)
        top1 = val[f"{self.attributes[0]}/top1"]
        logs["val_top1"] = top1
        for name, value in val.items():
            logs["val_" + name.replace("/", "_")] = value

        improved = top1 > self.state["best_top1"]
        if improved:
            self.state.update(best_top1=top1, best_epoch=step, wait=0)
            self.best_features = features
        else:
            self.state["wait"] += 1
        self.state["epoch"] = step
        self.state["model"] = "head" if isinstance(self.model, StyleHead) else "classifier"
        self.state["history"].append(
            {
                "epoch": step,
                "learning_rate": learning_rate,
                **{f"train/{k}": v for k, v in train.items()},
                **{f"val/{k}": v for k, v in val.items()},
            }
        )
        if self.patience and self.state["wait"] >= self.patience:
            self.state["stopped_early"] = True
            self.model.stop_training = True
        write_checkpoint(self.model, self.state, self.workdir, improved)
        logging.info(
            "epoch %d (%.1f s): train loss %.4f, val loss %.4f, val top-1 %.4f (best %.4f at "
            "epoch %d), lr %.3g%s",
            step,
            time.time() - self._epoch_start,
            train["loss"],
            val["loss"],
            top1,
            self.state["best_top1"],
            self.state["best_epoch"],
            learning_rate,
            ", stopping early" if self.state["stopped_early"] else "",
        )

    def on_train_end(self, logs=None):
        if self.best_features is not None and self.projector_metadata is not None:
            header, rows = self.projector_metadata
            write_projector(self.logdir, self.best_features, header, rows)
