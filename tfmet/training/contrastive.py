"""Contrastive fine-tuning of the Embedder on mined Met pairs (siamese, single scale).

The recipe of the Met reference (Ypsilantis et al., 2021), see docs/contrastive.md:

- loss on L2-normalised embeddings (`contrastive_loss`, margin 1.8):
  mean 0.5 * [y d^2 + (1 - y) relu(margin - sqrt(d^2 + eps))^2], y = 1 for a positive pair;
- both images of a pair go through the same Embedder (shared weights), in inference mode:
  BatchNorm keeps its ImageNet moving statistics (the reference's `BatchNorm.eval()`), while
  gamma/beta, the convolutions, GeM p and the projector are trained;
- Adam with L2 weight decay added to the gradient (PyTorch `Adam(weight_decay=...)`, not AdamW),
  step decay of the learning rate per epoch, gradient accumulation over `vbsizemul` sub-batches.

`ContrastiveTrainer` holds the model, optimizer and compiled steps; `train` runs the whole
resumable loop (mining, pairs, steps, validation, TensorBoard, checkpoints).
"""

import dataclasses
import json
import os
import shutil
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmet import backbones, metrics
from tfmet.data import met
from tfmet.data import pairs as pairs_lib
from tfmet.descriptors import extraction
from tfmet.descriptors import store as store_lib
from tfmet.descriptors.embedder import DescriptorExtractor, Embedder
from tfmet.io import safe_pickle
from tfmet.io.atomic import atomic_path, save_json
from tfmet.retrieval import KnnClassifier, PCAWhitening
from tfmet.training import mining
from tfmet.training.augment import AugmentConfig, Augmenter

MARGIN = 1.8
EPS = 1e-9  # added to d^2 under the square root, as the reference


def pair_squared_distances(first, second):
    """||first - second||^2 per row; `first`, `second` are [B, D]."""
    first = tf.convert_to_tensor(first, tf.float32)
    second = tf.convert_to_tensor(second, tf.float32)
    return tf.reduce_sum(tf.square(second - first), axis=-1)


def contrastive_loss(first, second, labels, margin=MARGIN, eps=EPS):
    """Per-pair contrastive loss [B].

    Args:
      first, second: embeddings [B, D] of the two images of each pair.
      labels: [B], 1 for a positive (same class) pair, 0 for a negative pair.
      margin: negatives closer than `margin` are pushed apart.
      eps: added to the squared distance before the square root (keeps its gradient finite).

    Returns:
      0.5 * [y d^2 + (1 - y) relu(margin - sqrt(d^2 + eps))^2], one value per pair.
    """
    squared = pair_squared_distances(first, second)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.float32)
    hinge = tf.nn.relu(margin - tf.sqrt(squared + eps))
    return 0.5 * (labels * squared + (1.0 - labels) * tf.square(hinge))


@keras.saving.register_keras_serializable(package="tfmet")
class ContrastiveLoss(keras.losses.Loss):
    """Keras loss over `contrastive_loss`.

    `y_true` holds the pair labels [B] (1 positive, 0 negative); `y_pred` the two embeddings of
    each pair stacked as [B, 2, D]. The default reduction averages over pairs, as the reference.

    Args:
      margin: the margin of the negatives' hinge (1.8 in the reference).
      eps: added to d^2 under the square root.
    """

    def __init__(
        self, margin=MARGIN, eps=EPS, reduction="sum_over_batch_size", name=None, **kwargs
    ):
        if margin <= 0:
            raise ValueError(f"`margin` must be positive. Received: margin={margin}")
        if eps < 0:
            raise ValueError(f"`eps` must be non-negative. Received: eps={eps}")
        super().__init__(name=name or "contrastive_loss", reduction=reduction, **kwargs)
        self.margin = float(margin)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        return contrastive_loss(y_pred[:, 0], y_pred[:, 1], y_true, self.margin, self.eps)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "eps": self.eps})
        return config


@keras.saving.register_keras_serializable(package="tfmet")
class TorchAdam(keras.optimizers.Adam):
    """Adam with PyTorch's update: w -= lr * m_hat / (sqrt(v_hat) + epsilon).

    Keras's Adam adds epsilon to sqrt(v) before the bias correction, i.e. uses
    epsilon / sqrt(1 - beta_2^t) in PyTorch's terms, which matters for the tiny gradients of a
    1e-7 learning-rate fine-tuning. Weight decay is not part of the optimizer: the trainer adds
    `weight_decay * w` to the gradient, as `torch.optim.Adam(weight_decay=...)` does.
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("TorchAdam does not implement amsgrad. Received: amsgrad=True")
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, **kwargs
        )

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1 = ops.cast(self.beta_1, variable.dtype)
        beta_2 = ops.cast(self.beta_2, variable.dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2))
        m_hat = ops.divide(m, 1 - ops.power(beta_1, step))
        v_hat = ops.divide(v, 1 - ops.power(beta_2, step))
        self.assign_sub(
            variable, ops.divide(ops.multiply(lr, m_hat), ops.add(ops.sqrt(v_hat), self.epsilon))
        )


class ContrastiveTrainer:
    """Siamese training steps over an `Embedder`, with gradient accumulation.

    Both images of every pair go through `embedder` in one batch, in inference mode (frozen
    BatchNorm statistics, as the reference's `BatchNorm.eval()`); every trainable variable of
    the embedder is updated, BatchNorm gamma/beta included (the reference keeps them trainable).

    A virtual batch is the sum of `accumulate` calls over sub-batches; `apply` then applies the
    gradient of the mean loss over all the pairs accumulated, plus the L2 weight decay term
    `weight_decay * w` (PyTorch's coupled Adam weight decay), with `TorchAdam`.

    Args:
      embedder: the `tfmet.descriptors.Embedder` to train (built or not).
      learning_rate: initial Adam learning rate (the reference's "backbone_lr", 1e-7).
      weight_decay: L2 coefficient added to the gradient (1e-6).
      margin, eps: of the contrastive loss.
      adam_epsilon: Adam's epsilon (PyTorch's default 1e-8).
    """

    def __init__(
        self,
        embedder,
        learning_rate=1e-7,
        weight_decay=1e-6,
        margin=MARGIN,
        eps=EPS,
        adam_epsilon=1e-8,
    ):
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive. Received: {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be non-negative. Received: {weight_decay}")
        if not embedder.built:
            embedder.build((None, None, None, 3))
        self.embedder = embedder
        self.weight_decay = float(weight_decay)
        self.loss = ContrastiveLoss(margin=margin, eps=eps)
        self.optimizer = TorchAdam(learning_rate=float(learning_rate), epsilon=adam_epsilon)
        self.variables = list(embedder.trainable_variables)
        self.optimizer.build(self.variables)
        self._sums = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="grad_sum")
            for v in self.variables
        ]
        self._count = tf.Variable(0.0, trainable=False, name="pairs_accumulated")
        self._accumulate = tf.function(self._accumulate_fn, reduce_retracing=True, autograph=False)
        self._apply = tf.function(self._apply_fn, autograph=False)

    @property
    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    @learning_rate.setter
    def learning_rate(self, value):
        self.optimizer.learning_rate = float(value)

    def embed_pairs(self, first, second):
        """Embeddings ([B, D], [B, D]) of two batches of raw images in [0, 255]."""
        images = tf.concat([first, second], axis=0)
        embeddings = self.embedder(self.embedder.preprocess(images), training=False)
        count = tf.shape(first)[0]
        return embeddings[:count], embeddings[count:]

    def _accumulate_fn(self, first, second, labels):
        with tf.GradientTape() as tape:
            e1, e2 = self.embed_pairs(first, second)
            losses = contrastive_loss(e1, e2, labels, self.loss.margin, self.loss.eps)
            total = tf.reduce_sum(losses)
        grads = tape.gradient(
            total, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        for accumulator, grad in zip(self._sums, grads, strict=True):
            accumulator.assign_add(tf.convert_to_tensor(grad))
        self._count.assign_add(tf.cast(tf.shape(losses)[0], tf.float32))
        return losses, pair_squared_distances(e1, e2)

    def _apply_fn(self):
        count = tf.maximum(self._count, 1.0)
        grads = [
            s / count + self.weight_decay * tf.convert_to_tensor(v)
            for s, v in zip(self._sums, self.variables, strict=True)
        ]
        self.optimizer.apply(grads, self.variables)
        for accumulator in self._sums:
            accumulator.assign(tf.zeros_like(accumulator))
        self._count.assign(0.0)

    def accumulate(self, first, second, labels):
        """Adds one sub-batch's loss gradient; returns (per-pair losses, squared distances)."""
        return self._accumulate(
            tf.convert_to_tensor(first, tf.float32),
            tf.convert_to_tensor(second, tf.float32),
            tf.convert_to_tensor(labels, tf.int32),
        )

    def apply(self):
        """One optimizer step with the mean gradient accumulated since the last step."""
        self._apply()

    def train_step(self, sub_batches):
        """accumulate over `sub_batches` [(first, second, labels), ...], then apply.

        Returns the mean loss over all their pairs (a float).
        """
        losses = [self.accumulate(*batch)[0] for batch in sub_batches]
        self.apply()
        return float(tf.reduce_mean(tf.concat(losses, axis=0)))


def step_decay(base_lr, epoch, step_size, gamma):
    """PyTorch StepLR stepped once per epoch: base_lr * gamma^floor((epoch - 1) / step_size).

    `epoch` counts from 1; epochs 1..step_size use `base_lr`.
    """
    if int(epoch) < 1 or int(step_size) < 1:
        raise ValueError(f"`epoch` and `step_size` must be >= 1. Received: {epoch}, {step_size}")
    return float(base_lr) * float(gamma) ** ((int(epoch) - 1) // int(step_size))


# --------------------------------------------------------------------------------------------
# The resumable training loop.

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
    }
)


@dataclasses.dataclass(frozen=True)
class MetTrainingData:
    """The database (training) images and the validation queries.

    Attributes:
      train_files, val_files: full image paths, JSON order.
      train_paths, val_paths: the JSON paths (recorded in descriptor manifests).
      train_labels, val_labels: int64 labels; -1 marks distractor queries.
      train_source, val_source: the ground-truth files read.
    """

    train_files: list
    train_paths: list
    train_labels: np.ndarray
    train_source: str
    val_files: list
    val_paths: list
    val_labels: np.ndarray
    val_source: str


def load_met_training_data(info_dir, image_root, mini=False):
    """Reads the (mini) database and the validation queries of a Met tree."""
    train = met.load_split(info_dir, "train", mini=mini)
    val = met.load_split(info_dir, "val")
    return MetTrainingData(
        train_files=met.image_paths(train, image_root),
        train_paths=list(train.paths),
        train_labels=train.labels,
        train_source=os.path.abspath(train.source),
        val_files=met.image_paths(val, image_root),
        val_paths=list(val.paths),
        val_labels=val.labels,
        val_source=os.path.abspath(val.source),
    )


def pooled_descriptor(embedder, images):
    """L2(GeM(backbone(x))) of raw images in [0, 255]: the descriptor before any projector."""
    features = embedder.backbone(embedder.preprocess(images), training=False)
    return embedder.normalize(embedder.pool(features))


class _PooledExtractor(tf.Module):
    """Single-scale descriptors before the projector (the reference mines epoch 1 with them)."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.extract = tf.function(
            lambda images: pooled_descriptor(self.embedder, images),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
            reduce_retracing=True,
        )

    def __call__(self, images):
        return self.extract(tf.convert_to_tensor(images, tf.float32))


def pooled_dim(embedder):
    """Dimension of the descriptor before the projector (the backbone's channels)."""
    return int(embedder.backbone.compute_output_shape((None, None, None, 3))[-1])


def read_initial_descriptors(path, count, dim):
    """Reads single-scale database descriptors to mine the first epoch's pairs with.

    `path` is a folder holding a tfmet descriptor store of the train split
    (`train_descriptors.npy` + `train_manifest.json`) or the reference's `descriptors.pkl`
    (read without executing pickle code), or that `.pkl` file itself.

    Returns:
      (descriptors float32 [count, dim], valid bool [count]).

    Raises:
      FileNotFoundError / ValueError naming the file and the problem.
    """
    path = os.fspath(path)
    pickle_path = path if path.endswith(".pkl") else os.path.join(path, "descriptors.pkl")
    if os.path.isdir(path) and store_lib.has_store(path, "train"):
        store = store_lib.read_store(path, "train", mmap=False)
        source = store_lib.array_path(path, "train")
        descriptors, valid = np.asarray(store.descriptors), store.valid
        scales = store.manifest.get("scales")
        if scales is not None and [float(s) for s in scales] != [1.0]:
            absl_logging.warning(
                "%s: descriptors were extracted at scales %s; the reference mines with "
                "single-scale descriptors",
                source,
                scales,
            )
    elif os.path.isfile(pickle_path):
        source = pickle_path
        arrays = safe_pickle.load_reference_descriptors(pickle_path)
        if "train_descriptors" not in arrays:
            raise ValueError(f"{pickle_path}: no 'train_descriptors' entry")
        descriptors = arrays["train_descriptors"]
        valid = np.ones(descriptors.shape[0], bool)
    else:
        raise FileNotFoundError(
            f"{path}: no initial descriptors (expected a tfmet store with train_manifest.json "
            "or the reference's descriptors.pkl)"
        )
    if descriptors.shape != (count, dim):
        raise ValueError(
            f"{source}: initial descriptors have shape {descriptors.shape}; the database has "
            f"{count} images and the model's descriptors {dim} dimensions"
        )
    if not np.all(np.isfinite(descriptors[valid])):
        raise ValueError(f"{source}: initial descriptors contain NaN or infinite values")
    return np.ascontiguousarray(descriptors, np.float32), np.asarray(valid, bool)


def init_projector_from_pca(embedder, descriptors):
    """Initialises the embedder's projector from PCA-whitening of `descriptors` (all dims).

    The reference learns PCA-whitening (shrinkage 1, every dimension kept) on the initial
    database descriptors and sets the projector to x -> (x - m) P.
    """
    if embedder.projector is None:
        raise ValueError("the embedder has no projector (set `emb_proj` to add one)")
    whitening = PCAWhitening(dim=embedder.projector_dim, shrinkage=1.0).fit(descriptors)
    embedder.projector.set_pca(whitening.mean, whitening.projection)
    return whitening


def knn_validation(train_descriptors, train_labels, val_descriptors, val_labels, backend):
    """GAP / GAP- / ACC of the K=1, tau=1 kNN classifier (the reference's per-epoch check)."""
    classifier = KnnClassifier(k=1, tau=1.0, backend=backend).fit(train_descriptors, train_labels)
    pred, conf = classifier.predict(val_descriptors)
    return metrics.evaluate(pred, conf, val_labels)


class _Progress:
    """Logs training progress (pairs/s, ETA) at most every `interval` seconds."""

    def __init__(self, what, total, interval=30.0):
        self.what = what
        self.total = total
        self.interval = interval
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done, message=""):
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.interval and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        absl_logging.info(
            "%s: %d/%d pairs, %.1f pairs/s, ETA %s %s",
            self.what,
            done,
            self.total,
            rate,
            _format_seconds(eta),
            message,
        )


def _format_seconds(seconds):
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


def default_config():
    """The reference's training settings (train_contrastive.py defaults), as a ConfigDict.

    Entries mirror the reference's flags (`net`, `pairs_type`, `epochs`, `bsize`, `vbsizemul`,
    `backbone_lr`, `wdecay`, `margin`, `imsize`, `sched_step`, `sched_gamma`, `emb_proj`, `pca`,
    `mini`, `seed`, `initeval`) plus tfmet's: backbone `weights` file, GeM `gem_p`/`train_p`,
    `augment`, `mining`, the validation `knn_backend`, `max_side` at inference, and run
    control (`stop_at_step`, logging, checkpoint frequency, parallelism).
    """
    config = ml_collections.ConfigDict()
    config.net = "resnet18"
    config.weights = ml_collections.FieldReference(None, field_type=str)
    config.pairs_type = "sim_siam_pos+new_neg"
    config.mini = False
    config.epochs = 10
    config.bsize = 64
    config.vbsizemul = 1
    config.backbone_lr = 1e-7
    config.wdecay = 1e-6
    config.margin = MARGIN
    config.imsize = 500
    config.sched_step = 6
    config.sched_gamma = 0.1
    config.emb_proj = False
    config.pca = False
    config.seed = 0
    config.initeval = False
    config.gem_p = 3.0
    config.train_p = True
    config.augment = ml_collections.ConfigDict(
        {
            "crop_scale": (0.7, 1.0),
            "crop_ratio": (0.99, 1.0 / 0.99),
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.4,
            "hue": 0.1,
            "jitter_prob": 0.8,
            "grayscale_prob": 0.2,
        }
    )
    config.mining = ml_collections.ConfigDict(
        {"top_k": mining.TOP_K, "pool": mining.NEGATIVE_POOL, "backend": "scann"}
    )
    config.knn_backend = "exact"
    config.max_side = ml_collections.FieldReference(None, field_type=int)
    config.stop_at_step = ml_collections.FieldReference(None, field_type=int)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 3
    config.keep_all_descriptors = False
    config.num_parallel_calls = -1
    config.extract_batch_images = 16
    config.progress = True
    return config


def _config_dict(config):
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def check_config(config):
    """Validates a training config (a dict); raises ValueError naming the bad entry."""
    mining.check_pair_type(config["pairs_type"])
    for key in ("epochs", "bsize", "vbsizemul", "imsize", "sched_step"):
        if int(config[key]) < 1:
            raise ValueError(f"config `{key}` must be a positive integer. Received: {config[key]}")
    for key in ("backbone_lr", "margin"):
        if float(config[key]) <= 0:
            raise ValueError(f"config `{key}` must be positive. Received: {config[key]}")
    for key in ("wdecay", "sched_gamma"):
        if float(config[key]) < 0:
            raise ValueError(f"config `{key}` must be non-negative. Received: {config[key]}")
    if config["pca"] and not config["emb_proj"]:
        raise ValueError("config `pca` initialises the projector: it needs `emb_proj` too")
    for key in ("backend",):
        if config["mining"][key] not in ("scann", "exact"):
            raise ValueError(f"config `mining.{key}` must be 'scann' or 'exact'")
    if config["knn_backend"] not in ("scann", "exact"):
        raise ValueError("config `knn_backend` must be 'scann' or 'exact'")
    augment_config(config)  # validates the augmentation entries
    return config


def augment_config(config):
    """The `AugmentConfig` of a training config."""
    a = config["augment"]
    return AugmentConfig(
        image_size=int(config["imsize"]),
        crop_scale=tuple(a["crop_scale"]),
        crop_ratio=tuple(a["crop_ratio"]),
        brightness=float(a["brightness"]),
        contrast=float(a["contrast"]),
        saturation=float(a["saturation"]),
        hue=float(a["hue"]),
        jitter_prob=float(a["jitter_prob"]),
        grayscale_prob=float(a["grayscale_prob"]),
    )


def build_embedder(config):
    """The Embedder of a training config: registry backbone (+ local weights), GeM, projector."""
    weights = config.get("weights")
    if weights is not None and not os.path.exists(weights):  # a file or checkpoint directory
        raise FileNotFoundError(f"{weights}: backbone weights file not found")
    keras.utils.set_random_seed(int(config["seed"]))
    spec = backbones.spec(config["net"])
    backbone = spec.builder(weights=weights)
    dim = int(backbone.compute_output_shape((None, None, None, 3))[-1])
    embedder = Embedder(
        backbone,
        p=float(config["gem_p"]),
        train_p=bool(config["train_p"]),
        projector_dim=dim if config["emb_proj"] else None,
        preprocessing=spec.preprocessing,
        pooling=spec.pooling,
    )
    embedder.build((None, None, None, 3))
    return embedder


class _RunState:
    """The checkpointed state: model, optimizer, progress counters and the epoch loss sums."""

    def __init__(self, trainer, directory, keep):
        self.trainer = trainer
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="loss_sum")
        self.loss_pairs = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="loss_pairs")
        self.checkpoint = tf.train.Checkpoint(
            embedder=trainer.embedder,
            optimizer=trainer.optimizer,
            epoch=self.epoch,
            step_in_epoch=self.step_in_epoch,
            loss_sum=self.loss_sum,
            loss_pairs=self.loss_pairs,
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
    path = os.path.join(workdir, CONFIG_FILE)
    has_checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR)) is not None
    if has_checkpoint and not resume:
        raise ValueError(
            f"{workdir} already holds checkpoints of a run; pass resume (--resume) to continue "
            "it, or use a new workdir"
        )
    record = json.loads(json.dumps(record))  # tuples -> lists, as read back from JSON
    if has_checkpoint and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        differences = sorted(
            key
            for key in set(recorded) | set(record)
            if key not in RESUMABLE_CHANGES and recorded.get(key) != record.get(key)
        )
        if differences:
            details = "; ".join(
                f"{k}: {recorded.get(k)!r} recorded, {record.get(k)!r} now" for k in differences
            )
            raise ValueError(f"{path}: cannot resume with a different setup ({details})")
    save_json(path, record)
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
    spec = extraction.ExtractionSpec(
        backbone=config["net"],
        weights=name,
        scales=(1.0,),
        resize_method="torch",
        max_side=config.get("max_side"),
        dim=dim,
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


def _log_scalars(writer, step, values):
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)


def train(config, info_dir, image_root, workdir, init_descr=None, resume=False):
    """Runs (or resumes) contrastive training on the Met database; see the module docstring.

    Every epoch: mine the pairs from the previous epoch's database descriptors (the initial ones
    for epoch 1), train on them, extract single-scale database and validation descriptors,
    evaluate the K=1, tau=1 kNN (GAP / GAP- / ACC), write TensorBoard summaries and a
    checkpoint. The workdir holds:

        config.json            the run's settings (a resumed run must match them)
        checkpoints/           tf.train.CheckpointManager: model, optimizer, epoch, step
        descriptors/epoch_<e>  descriptor stores (train, val) after epoch e; epoch_0 = initial
        tensorboard/           summaries
        history.json           per-epoch numbers
        model/embedder.keras   the final Embedder (for `tfmet-extract`), and
        model/backbone.weights.h5

    Args:
      config: the training config (`configs/met_contrastive_r18.py`), a ConfigDict or dict.
      info_dir: folder with the Met ground-truth JSON files.
      image_root: folder holding `images/`.
      workdir: output folder.
      init_descr: optional initial single-scale database descriptors (see
        `read_initial_descriptors`); extracted with the initial model when None.
      resume: continue from the latest checkpoint in `workdir` (from scratch if there is none).

    Returns:
      a `TrainResult`. With `config.stop_at_step` the run stops (checkpointed) once that many
      optimizer steps are done, with `finished=False`; call again with resume=True to go on.
    """
    config = check_config(_config_dict(config))
    workdir = os.fspath(workdir)
    data = load_met_training_data(info_dir, image_root, bool(config["mini"]))
    record = dict(config, init_descr=None if init_descr is None else os.path.abspath(init_descr))
    _prepare_workdir(workdir, record, resume)

    embedder = build_embedder(config)
    trainer = ContrastiveTrainer(
        embedder,
        learning_rate=float(config["backbone_lr"]),
        weight_decay=float(config["wdecay"]),
        margin=float(config["margin"]),
    )
    state = _RunState(
        trainer, os.path.join(workdir, CHECKPOINT_DIR), int(config["keep_checkpoints"])
    )
    restored = state.restore() if resume else None
    if resume and restored is None:
        absl_logging.info("%s: no checkpoint to resume from; starting from scratch", workdir)
    elif restored:
        absl_logging.info(
            "Resumed %s: epoch %d done, step %d of the next, global step %d",
            restored,
            int(state.epoch.numpy()),
            int(state.step_in_epoch.numpy()),
            state.global_step,
        )
    history = _read_history(workdir) if restored else []
    writer = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
    loop = _TrainingLoop(config, data, workdir, init_descr, trainer, state, writer, history)
    try:
        return loop.run(fresh=restored is None)
    finally:
        writer.close()


class _TrainingLoop:
    """The epochs of one `train` call (state lives in `_RunState` and the workdir)."""

    def __init__(self, config, data, workdir, init_descr, trainer, state, writer, history):
        self.config = config
        self.data = data
        self.workdir = workdir
        self.init_descr = init_descr
        self.trainer = trainer
        self.state = state
        self.writer = writer
        self.history = history
        self.embedder = trainer.embedder
        self.extractor = DescriptorExtractor(self.embedder, scales=(1.0,))
        self.augmenter = Augmenter(augment_config(config))
        backend = config["mining"]["backend"]
        self.search = lambda database, queries, k: mining.knn_search(database, queries, k, backend)

    # -- helpers -------------------------------------------------------------------------------

    def _extract(self, extractor, name, dim, split, output_dir):
        d = self.data
        files, paths, labels, source = (
            (d.train_files, d.train_paths, d.train_labels, d.train_source)
            if split == "train"
            else (d.val_files, d.val_paths, d.val_labels, d.val_source)
        )
        return _extract(
            extractor, name, dim, split, files, paths, labels, source, output_dir, self.config
        )

    def _model_name(self):
        return f"contrastive:{self.config['net']}:step={self.state.global_step}"

    def _validate(self, output_dir):
        """Extracts database + val descriptors with the current model and evaluates the kNN."""
        dim = self.embedder.output_dim
        train_store = self._extract(self.extractor, self._model_name(), dim, "train", output_dir)
        val_store = self._extract(self.extractor, self._model_name(), dim, "val", output_dir)
        valid = train_store.valid
        scores = knn_validation(
            train_store.descriptors[valid],
            self.data.train_labels[valid],
            val_store.descriptors,
            self.data.val_labels,
            self.config["knn_backend"],
        )
        return scores, train_store

    def _mining_descriptors(self, epoch):
        """(descriptors, valid) of the database after `epoch` (0: the initial ones)."""
        if epoch == 0 and self.init_descr is not None:
            return read_initial_descriptors(
                self.init_descr, len(self.data.train_files), pooled_dim(self.embedder)
            )
        directory = _descriptor_dir(self.workdir, epoch)
        if not store_lib.has_store(directory, "train"):
            raise FileNotFoundError(
                f"{directory}: the database descriptors of epoch {epoch}, needed to mine the "
                "next epoch's pairs, are missing"
            )
        store = store_lib.read_store(directory, "train", mmap=False)
        return np.asarray(store.descriptors), store.valid

    def _gem_p(self):
        return float(keras.ops.convert_to_numpy(self.embedder.pool.power))

    # -- phases --------------------------------------------------------------------------------

    def _initialise(self):
        """Initial descriptors (epoch 1's mining), PCA projector, optional initial evaluation."""
        c = self.config
        weights = c.get("weights")
        fingerprint = extraction.weights_fingerprint(weights, c["seed"])
        if self.init_descr is None:
            absl_logging.info("Extracting the initial single-scale database descriptors")
            self._extract(
                _PooledExtractor(self.embedder),
                f"initial:{c['net']}:{fingerprint}:p={c['gem_p']}",
                pooled_dim(self.embedder),
                "train",
                _descriptor_dir(self.workdir, 0),
            )
        if c["pca"]:
            descriptors, valid = self._mining_descriptors(0)
            init_projector_from_pca(self.embedder, descriptors[valid])
            absl_logging.info("Projector initialised from PCA-whitening of the initial descriptors")
        if c["initeval"]:
            scores, _ = self._validate(os.path.join(self.workdir, DESCRIPTOR_DIR, "initeval"))
            absl_logging.info("Initial validation: %s", _format_scores(scores))
            _log_scalars(self.writer, 0, {f"val/{k}": v for k, v in scores.items()})
            self.history.append({"epoch": 0, **{f"val_{k}": v for k, v in scores.items()}})
            save_json(os.path.join(self.workdir, HISTORY_FILE), self.history)
        self.state.save()

    def _train_epoch(self, epoch):
        """Trains the remaining steps of `epoch`; True if stopped early at `stop_at_step`."""
        c, state, trainer = self.config, self.state, self.trainer
        lr = step_decay(c["backbone_lr"], epoch, c["sched_step"], c["sched_gamma"])
        trainer.learning_rate = lr
        descriptors, valid = self._mining_descriptors(epoch - 1)
        rng = np.random.default_rng([int(c["seed"]), epoch])
        started = time.perf_counter()
        pairs = mining.make_pairs(
            c["pairs_type"],
            self.data.train_labels,
            rng,
            descriptors=descriptors if mining.needs_descriptors(c["pairs_type"]) else None,
            valid=valid,
            top_k=int(c["mining"]["top_k"]),
            pool=int(c["mining"]["pool"]),
            search=self.search,
        ).shuffled(rng)
        stats = pairs.statistics()
        stats["unreadable_images"] = int(np.sum(~valid))
        negatives = pairs.kind == mining.NEGATIVE
        if negatives.any():
            stats["negative_similarity"] = _mean_pair_similarity(
                descriptors, pairs.first[negatives], pairs.second[negatives]
            )
        absl_logging.info(
            "Epoch %d: lr %.3g, %s (mined in %.1f s)",
            epoch,
            lr,
            stats,
            time.perf_counter() - started,
        )
        self.pair_stats = stats

        bsize, vbs = int(c["bsize"]), int(c["vbsizemul"])
        sub_batches = pairs_lib.num_batches(len(pairs), bsize)
        virtual_steps = -(-sub_batches // vbs)
        done = int(state.step_in_epoch.numpy())
        if done == 0:
            state.loss_sum.assign(0.0)
            state.loss_pairs.assign(0.0)
        dataset = pairs_lib.pair_dataset(
            self.data.train_files,
            pairs,
            self.augmenter,
            bsize,
            int(c["seed"]),
            epoch,
            start=min(done * vbs * bsize, len(pairs)),
            num_parallel_calls=int(c["num_parallel_calls"]),
        )
        self.distances = {"positive": [], "negative": []}
        progress = _Progress(f"epoch {epoch}", len(pairs))
        batches = iter(dataset)
        for step in range(done, virtual_steps):
            count = min(vbs, sub_batches - step * vbs)
            losses = []
            for _ in range(count):
                batch = next(batches)
                loss, squared = trainer.accumulate(batch["first"], batch["second"], batch["label"])
                losses.append(loss.numpy())
                positive = batch["label"].numpy() == 1
                distances = np.sqrt(np.maximum(squared.numpy(), 0.0))
                self.distances["positive"].append(distances[positive])
                self.distances["negative"].append(distances[~positive])
            trainer.apply()
            losses = np.concatenate(losses)
            state.step_in_epoch.assign(step + 1)
            state.loss_sum.assign_add(float(np.sum(losses, dtype=np.float64)))
            state.loss_pairs.assign_add(float(losses.size))
            global_step = state.global_step
            if global_step % int(c["log_every_steps"]) == 0 or step + 1 == virtual_steps:
                _log_scalars(
                    self.writer,
                    global_step,
                    {
                        "train/loss": float(np.mean(losses)),
                        "train/learning_rate": lr,
                        "train/gem_p": self._gem_p(),
                    },
                )
            progress.update(
                min((step + 1) * vbs * bsize, len(pairs)), f"loss {float(np.mean(losses)):.4f}"
            )
            every = int(c["checkpoint_every_steps"])
            if every and global_step % every == 0:
                state.save()
            stop = c.get("stop_at_step")
            if stop is not None and global_step >= int(stop):
                state.save()
                absl_logging.info("Stopping at global step %d (stop_at_step)", global_step)
                return True
        state.save()  # the epoch's steps are done; validation may take long
        return False

    def _finish_epoch(self, epoch, seconds):
        c, state = self.config, self.state
        started = time.perf_counter()
        scores, _ = self._validate(_descriptor_dir(self.workdir, epoch))
        loss = float(state.loss_sum.numpy() / max(state.loss_pairs.numpy(), 1.0))
        entry = {
            "epoch": epoch,
            "global_step": state.global_step,
            "loss": loss,
            "learning_rate": self.trainer.learning_rate,
            "gem_p": self._gem_p(),
            **{f"val_{k}": v for k, v in scores.items()},
            "pairs": self.pair_stats,
            "train_seconds": seconds,
            "validation_seconds": time.perf_counter() - started,
        }
        absl_logging.info(
            "Epoch %d: loss %.5f, val %s, GeM p %.4f",
            epoch,
            loss,
            _format_scores(scores),
            entry["gem_p"],
        )
        step = state.global_step
        with self.writer.as_default(step=step):
            tf.summary.scalar("epoch/loss", loss)
            tf.summary.scalar("epoch/gem_p", entry["gem_p"])
            for key, value in scores.items():
                tf.summary.scalar(f"val/{key}", value)
            for key, value in self.pair_stats.items():
                tf.summary.scalar(f"pairs/{key}", value)
            for key, chunks in self.distances.items():
                if chunks and np.concatenate(chunks).size:
                    values = np.concatenate(chunks)
                    tf.summary.histogram(f"pairs/{key}_distance", values)
                    if key == "negative":
                        active = float(np.mean(values < float(c["margin"])))
                        tf.summary.scalar("pairs/active_negatives", active)
            tf.summary.scalar("epoch/train_seconds", seconds)
        self.writer.flush()
        self.history.append(entry)
        save_json(os.path.join(self.workdir, HISTORY_FILE), self.history)
        state.epoch.assign(epoch)
        state.step_in_epoch.assign(0)
        state.save()
        if not c["keep_all_descriptors"] and epoch >= 2:
            shutil.rmtree(_descriptor_dir(self.workdir, epoch - 1), ignore_errors=True)

    def _finalise(self):
        model_dir = os.path.join(self.workdir, MODEL_DIR)
        os.makedirs(model_dir, exist_ok=True)
        model_path = os.path.join(model_dir, MODEL_FILE)
        weights_path = os.path.join(model_dir, BACKBONE_WEIGHTS_FILE)
        with atomic_path(model_path) as tmp:
            self.embedder.save(tmp)
        with atomic_path(weights_path) as tmp:
            self.embedder.backbone.save_weights(tmp)
        absl_logging.info(
            "Final model written to %s (backbone weights: %s)", model_path, weights_path
        )
        return self._result(True, model_path, weights_path)

    def _result(self, finished, model_path=None, weights_path=None):
        return TrainResult(
            workdir=self.workdir,
            epochs_completed=int(self.state.epoch.numpy()),
            global_step=self.state.global_step,
            finished=finished,
            history=list(self.history),
            model_path=model_path,
            backbone_weights_path=weights_path,
        )

    def run(self, fresh):
        if fresh:
            self._initialise()
        for epoch in range(int(self.state.epoch.numpy()) + 1, int(self.config["epochs"]) + 1):
            started = time.perf_counter()
            if self._train_epoch(epoch):
                return self._result(False)
            self._finish_epoch(epoch, time.perf_counter() - started)
        return self._finalise()


def _mean_pair_similarity(descriptors, first, second, chunk=65536):
    """Mean inner product of descriptor rows first[i], second[i], a chunk at a time."""
    total = 0.0
    for start in range(0, first.size, chunk):
        a = descriptors[first[start : start + chunk]]
        b = descriptors[second[start : start + chunk]]
        total += float(np.einsum("ij,ij->", a, b, dtype=np.float64))
    return total / max(first.size, 1)


def _format_scores(scores):
    return ", ".join(f"{key} {100.0 * value:.2f}" for key, value in scores.items())
