"""The Embedder a training config describes (`build_embedder`) and `ContrastiveTrainer`: the
siamese Embedder, its optimizer and the compiled training steps."""

import os

import keras
import tensorflow as tf

from tfmet import backbones
from tfmet.backbones.precision import set_precision
from tfmet.descriptors.embedder import Embedder
from tfmet.training.contrastive.config import MARGIN, _config_dict
from tfmet.training.contrastive.loss import (
    EPS,
    ContrastiveLoss,
    contrastive_loss,
    pair_squared_distances,
)
from tfmet.training.contrastive.optimizer import TorchAdam
from tfmet.training.distribute import distribute_batch


def build_embedder(config):
    """The Embedder of a training config: registry backbone (+ local weights), GeM, projector."""
    config = _config_dict(config)
    weights = config.get("weights")
    if weights is not None and not os.path.exists(weights):  # a file or checkpoint directory
        raise FileNotFoundError(f"{weights}: backbone weights file not found")
    keras.utils.set_random_seed(int(config["seed"]))
    spec = backbones.spec(config["backbone"])
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
    set_precision(embedder.backbone, config.get("precision", "float32"))
    return embedder


class ContrastiveTrainer:
    """Siamese training steps over an `Embedder`, with gradient accumulation.

    Both images of every pair go through `embedder` in one batch, in inference mode (frozen
    BatchNorm statistics, as the reference's `BatchNorm.eval()`); every trainable variable of
    the embedder is updated, BatchNorm gamma/beta included (the reference keeps them trainable).

    A virtual batch is the sum of `accumulate` calls over sub-batches; `apply` then applies the
    gradient of the mean loss over all the pairs accumulated, plus the L2 weight decay term
    `weight_decay * w` (PyTorch's coupled Adam weight decay), with `TorchAdam`.

    With `loss_scaling` (for a float16 backbone, `tfmet.backbones.precision`) the optimizer is a
    `keras.optimizers.LossScaleOptimizer` over `TorchAdam`: gradients are taken of the loss
    times its dynamic scale (so small float16 gradients do not flush to zero), summed, unscaled
    when applied, and a step whose gradient is not finite is skipped and the scale halved.
    The loss itself is computed in float32 (the embedder's L2 output is float32).

    Under a `tf.distribute` strategy (`strategy`, see `tfmet.training.distribute`), build the
    embedder and the trainer under `strategy.scope()` and pass a GLOBAL sub-batch to
    `accumulate`: its pairs are split across the replicas, each replica adds the gradient of
    the SUM of its pairs' losses, the sums are all-reduced, and `apply` divides by the number
    of pairs of the whole virtual batch (the count is all-reduced too). Each pair's loss
    depends on that pair alone, so this is the single-device gradient of the same global
    batch (as `tf.nn.compute_average_loss` with the virtual batch's size), up to the order of
    float additions.

    Args:
      embedder: the `tfmet.descriptors.Embedder` to train (built or not).
      learning_rate: initial Adam learning rate (the reference's "backbone_lr", 1e-7).
      weight_decay: L2 coefficient added to the gradient (1e-6).
      margin, eps: of the contrastive loss.
      adam_epsilon: Adam's epsilon (PyTorch's default 1e-8).
      loss_scaling: wrap the optimizer in dynamic loss scaling (use it for float16).
      strategy: the `tf.distribute.Strategy` the embedder was built under (None: the current
        one, TensorFlow's default strategy outside any scope).
    """

    def __init__(
        self,
        embedder,
        learning_rate=1e-7,
        weight_decay=1e-6,
        margin=MARGIN,
        eps=EPS,
        adam_epsilon=1e-8,
        loss_scaling=False,
        strategy=None,
    ):
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive. Received: {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be non-negative. Received: {weight_decay}")
        if not embedder.built:
            embedder.build((None, None, None, 3))
        self.strategy = strategy or tf.distribute.get_strategy()
        self.embedder = embedder
        self.weight_decay = float(weight_decay)
        self.loss = ContrastiveLoss(margin=margin, eps=eps)
        with self.strategy.scope():
            self.optimizer = TorchAdam(learning_rate=float(learning_rate), epsilon=adam_epsilon)
            self.loss_scaling = bool(loss_scaling)
            if self.loss_scaling:
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
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

    def _replica_gradients(self, first, second, labels):
        """On one replica: the gradient of the sum of its pairs' losses, the losses, the
        squared distances and the number of pairs."""
        with tf.GradientTape() as tape:
            e1, e2 = self.embed_pairs(first, second)
            losses = contrastive_loss(e1, e2, labels, self.loss.margin, self.loss.eps)
            total = tf.reduce_sum(losses)
            if self.loss_scaling:
                total = self.optimizer.scale_loss(total)
        grads = tape.gradient(
            total, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        grads = [tf.convert_to_tensor(grad) for grad in grads]
        count = tf.cast(tf.shape(losses)[0], tf.float32)
        return grads, losses, pair_squared_distances(e1, e2), count

    def _accumulate_fn(self, first, second, labels):
        strategy = self.strategy
        grads, losses, squared, count = strategy.run(
            self._replica_gradients, args=(first, second, labels)
        )
        for accumulator, grad in zip(self._sums, grads, strict=True):
            accumulator.assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, grad, axis=None))
        self._count.assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))
        return strategy.gather(losses, axis=0), strategy.gather(squared, axis=0)

    def _apply_fn(self):
        count = tf.maximum(self._count, 1.0)
        # With loss scaling the sums hold gradients of the scaled loss: scale the decay alike.
        decay = self.weight_decay * (self.optimizer.dynamic_scale if self.loss_scaling else 1.0)
        grads = [
            s / count + decay * tf.convert_to_tensor(v)
            for s, v in zip(self._sums, self.variables, strict=True)
        ]
        self.optimizer.apply(grads, self.variables)
        for accumulator in self._sums:
            accumulator.assign(tf.zeros_like(accumulator))
        self._count.assign(0.0)

    def accumulate(self, first, second, labels):
        """Adds one sub-batch's loss gradient; returns (per-pair losses, squared distances).

        `first`, `second`, `labels` are the global sub-batch; under a strategy with several
        replicas its pairs are split across them (`tfmet.training.distribute.distribute_batch`).
        """
        return self._accumulate(
            *distribute_batch(
                self.strategy,
                tf.convert_to_tensor(first, tf.float32),
                tf.convert_to_tensor(second, tf.float32),
                tf.convert_to_tensor(labels, tf.int32),
            )
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
