"""Training loops of the style classifier: the head on cached features, or the whole classifier.

Both run `keras.Model.fit` with one `tfmet.training.style.monitor.StyleMonitor` callback: per-epoch
validation, TensorBoard scalars and confusion matrices, resumable checkpoints, early stopping, and
at the end the embedding projector of the best epoch's validation features.
"""

import dataclasses
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmet.backbones.precision import model_precision
from tfmet.metrics.topk import TopKAccuracy
from tfmet.training.style.checkpoints import (
    checkpoint_paths,
    has_checkpoint,
    load_optimizer,
    load_weights,
    read_state,
)
from tfmet.training.style.evaluate import TOP_KS
from tfmet.training.style.model import MaskedSparseCrossEntropy
from tfmet.training.style.monitor import StyleMonitor

OPTIMIZERS = ("rmsprop", "adam", "sgd")
SCHEDULES = ("constant", "cosine")


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
