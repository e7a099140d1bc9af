"""Training loops of the style classifier: the head on cached features, or the whole classifier.

Both run `keras.Model.fit` with one `StyleMonitor` callback that, after every epoch:

- evaluates the validation split once (loss, top-1/3/5 per attribute);
- writes TensorBoard scalars under `<workdir>/tensorboard/{train,val}` (loss, `<attribute>/top1`
  ..., `learning_rate`) and a confusion-matrix image per attribute;
- saves the resumable checkpoint `<workdir>/checkpoints/` (`tfmet.training.style.checkpoints`;
  `best.weights.npz` is new when validation top-1 of the first attribute improves);
- stops training after `patience` epochs without improvement.

At the end it writes the validation features of the best epoch to the TensorBoard embedding
projector (`<workdir>/tensorboard/projector_config.pbtxt`, labels and paths as metadata).
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.backbones.precision import model_precision
from tfmet.io.atomic import (
    atomic_path,
)
from tfmet.metrics.topk import TopKAccuracy, top_k_accuracy
from tfmet.training.style.checkpoints import (
    checkpoint_paths,
    has_checkpoint,
    load_optimizer,
    load_weights,
    read_state,
    write_checkpoint,
)
from tfmet.training.style.evaluate import TOP_KS, confusion_image, confusion_matrix
from tfmet.training.style.model import MaskedSparseCrossEntropy, StyleHead

OPTIMIZERS = ("rmsprop", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
TENSORBOARD_DIR = "tensorboard"


@dataclasses.dataclass
class TrainSettings:
    """Hyper-parameters of a training run.

    Attributes:
      epochs: maximum number of epochs.
      batch_size: images (or feature rows) per step.
      optimizer: "rmsprop" (RASTA), "adam" or "sgd" (momentum 0.9).
      learning_rate: initial learning rate.
      schedule: "constant" or "cosine" (decay to 0 over all steps).
      patience: epochs without a better validation top-1 before stopping; 0 disables stopping.
      seed: seeds Keras, TF and numpy.
    """

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    patience: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}. Received: {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be positive. Received: epochs={self.epochs}, "
                f"batch_size={self.batch_size}"
            )


def make_optimizer(settings, steps_per_epoch):
    learning_rate = settings.learning_rate
    if settings.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            settings.learning_rate, decay_steps=max(1, settings.epochs * steps_per_epoch)
        )
    if settings.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    if settings.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=0.9)


def compile_for_attributes(model, attributes, optimizer):
    model.compile(
        optimizer=optimizer,
        loss={a: MaskedSparseCrossEntropy() for a in attributes},
        metrics={a: [TopKAccuracy(k) for k in TOP_KS] for a in attributes},
    )


# --- TensorBoard -----------------------------------------------------------------------------


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


# --- Fitting ---------------------------------------------------------------------------------


def _prepare_run(model, settings, steps_per_epoch, workdir, resume):
    """Compiles `model`; restores its checkpoint when resuming. Returns the state or None."""
    optimizer = make_optimizer(settings, steps_per_epoch)
    if model_precision(model) == "float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    compile_for_attributes(model, model_attributes(model), optimizer)
    paths = checkpoint_paths(workdir)
    if has_checkpoint(workdir) and not resume:
        raise ValueError(
            f"{workdir} already holds a training checkpoint; pass --resume to continue it or "
            "choose a new workdir"
        )
    if not (resume and has_checkpoint(workdir)):
        if resume:
            logging.info("No checkpoint in %s: starting from scratch", workdir)
        return None
    state = read_state(workdir)
    load_weights(model, paths["last"])
    load_optimizer(optimizer, model.trainable_variables, paths["optimizer"])
    logging.info(
        "Resuming from epoch %d (best val top-1 %.4f at epoch %d)",
        state["epoch"],
        state["best_top1"],
        state["best_epoch"],
    )
    return state


def model_attributes(model):
    head = getattr(model, "head", model)
    return head.attributes


def _fit(model, data, steps_per_epoch, settings, monitor, state):
    initial_epoch = 0 if state is None else int(state["epoch"])
    if state is not None and (state.get("stopped_early") or initial_epoch >= settings.epochs):
        logging.info("The checkpoint's run already finished (epoch %d)", initial_epoch)
        return monitor.state
    if tf.distribute.has_strategy():
        # A model built under a strategy's scope makes Keras build its metrics from a batch
        # taken off a throw-away iterator of `data` (`_maybe_symbolic_build` in
        # keras/src/backend/tensorflow/trainer.py): that uses up one shuffle order, so the run
        # would no longer see the single-device run's batches, and it fails on per-replica
        # batches of unequal size. Build them from the dataset's element spec instead; without
        # the attribute, `fit` takes the strategy of the scope it runs in.
        model._symbolic_build(data_batch=data.element_spec)
        model._distribute_strategy = None
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            _logs_as_vectors(model)
    model.fit(
        data,
        epochs=settings.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=[monitor],
        shuffle=False,
        verbose=0,
    )
    return monitor.state


def _logs_as_vectors(model):
    """Under MultiWorkerMirroredStrategy, Keras (3.15) averages a train step's logs across the
    workers with `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalar metric
    results ("Invalid reduction dimension 0"). The results are the same on every worker (metric
    variables are all-reduced when read), so the step returns them as [1] vectors, whose mean
    over axis 0 is the scalar again."""
    step = model.train_step

    def train_step(data):
        return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

    model.train_step = train_step


def restore_best(model, workdir):
    """Loads the best epoch's weights into `model` (a missing file raises FileNotFoundError)."""
    path = checkpoint_paths(workdir)["best"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no best checkpoint at {path}: training saved no epoch")
    return load_weights(model, path)


def train_head(
    head,
    train_features,
    train_labels,
    val_features,
    val_labels,
    settings,
    workdir,
    resume=False,
    projector_metadata=None,
):
    """Trains a `StyleHead` on cached features (bottleneck mode); returns the final state.

    The head ends with the best epoch's weights.
    """
    keras.utils.set_random_seed(settings.seed)
    train_features = np.asarray(train_features, np.float32)
    val_features = np.asarray(val_features, np.float32)
    if not head.built:
        head.build((None, train_features.shape[1]))
    steps = max(1, math.ceil(len(train_features) / settings.batch_size))
    state = _prepare_run(head, settings, steps, workdir, resume)
    data = (
        tf.data.Dataset.from_tensor_slices(
            (train_features, {a: np.asarray(v, np.int32) for a, v in train_labels.items()})
        )
        .shuffle(len(train_features), seed=settings.seed, reshuffle_each_iteration=True)
        .batch(settings.batch_size)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )

    @tf.function(reduce_retracing=True)
    def forward(features):
        return head(features, training=False)

    def evaluate(model):
        del model
        parts = [forward(val_features[i : i + 4096]) for i in range(0, len(val_features), 4096)]
        logits = {a: np.concatenate([p[a].numpy() for p in parts]) for a in head.attributes}
        return logits, val_features

    return _fit_monitored(
        head, data, steps, evaluate, val_labels, settings, workdir, state, projector_metadata
    )


def train_classifier(
    classifier,
    train_data,
    steps_per_epoch,
    val_data,
    val_labels,
    settings,
    workdir,
    resume=False,
    projector_metadata=None,
):
    """Trains a `StyleClassifier` end to end (its trainable flags set beforehand).

    Args:
      classifier: a built `StyleClassifier`.
      train_data: repeated dataset of (images, {attribute: labels}).
      steps_per_epoch: steps of `train_data` per epoch.
      val_data: finite dataset of (images, labels) in validation order.
      val_labels: attribute -> labels of `val_data`, in order.
      settings, workdir, resume, projector_metadata: as in `train_head`.

    Returns:
      the final state; the classifier ends with the best epoch's weights.
    """
    keras.utils.set_random_seed(settings.seed)
    state = _prepare_run(classifier, settings, steps_per_epoch, workdir, resume)

    @tf.function(reduce_retracing=True)
    def forward(images):
        features = classifier.features(images, training=False)
        return classifier.head(features, training=False), features

    def evaluate(model):
        del model
        logits, features = {a: [] for a in classifier.attributes}, []
        for images, _ in val_data:
            batch_logits, batch_features = forward(images)
            for a in logits:
                logits[a].append(batch_logits[a].numpy())
            features.append(batch_features.numpy())
        return {a: np.concatenate(v) for a, v in logits.items()}, np.concatenate(features)

    return _fit_monitored(
        classifier,
        train_data,
        steps_per_epoch,
        evaluate,
        val_labels,
        settings,
        workdir,
        state,
        projector_metadata,
    )


def _fit_monitored(
    model, data, steps, evaluate, val_labels, settings, workdir, state, projector_metadata
):
    """`_fit` under a `StyleMonitor` (validation, checkpoints, early stopping), then the best
    epoch's weights restored; returns the final state."""
    monitor = StyleMonitor(
        workdir,
        evaluate,
        val_labels,
        model.class_names,
        settings.patience,
        state,
        projector_metadata,
        steps_per_epoch=steps,
        batch_size=settings.batch_size,
    )
    state = _fit(model, data, steps, settings, monitor, state)
    restore_best(model, workdir)
    return state
