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

The names below are imported on first use (the package itself loads nothing), so that a program
can read `mining.PAIR_TYPES` or a config and fail on bad input before TensorFlow loads.
"""

from tfmet.io.lazy import lazy_exports

_EXPORTS = {
    "BACKBONE_WEIGHTS_FILE": "workdir",
    "CHECKPOINT_DIR": "workdir",
    "CONFIG_FILE": "workdir",
    "ContrastiveLoss": "loss",
    "ContrastiveTrainer": "trainer",
    "DESCRIPTOR_DIR": "workdir",
    "EPS": "loss",
    "HISTORY_FILE": "workdir",
    "MARGIN": "loss",
    "MODEL_DIR": "workdir",
    "MODEL_FILE": "workdir",
    "MetTrainingData": "data",
    "RESUMABLE_CHANGES": "workdir",
    "TENSORBOARD_DIR": "workdir",
    "TorchAdam": "optimizer",
    "TrainResult": "workdir",
    "augment_config": "config",
    "build_embedder": "config",
    "check_config": "config",
    "contrastive_loss": "loss",
    "default_config": "config",
    "init_projector_from_pca": "data",
    "knn_validation": "data",
    "load_met_training_data": "data",
    "pair_squared_distances": "loss",
    "pooled_descriptor": "data",
    "pooled_dim": "data",
    "read_initial_descriptors": "data",
    "step_decay": "optimizer",
    "train": "loop",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
