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
resumable loop (mining, pairs, steps, validation, TensorBoard, checkpoints)."""

from tfmet.training.contrastive.config import (  # noqa: F401
    augment_config,
    build_embedder,
    check_config,
    default_config,
)
from tfmet.training.contrastive.data import (  # noqa: F401
    MetTrainingData,
    init_projector_from_pca,
    knn_validation,
    load_met_training_data,
    pooled_descriptor,
    pooled_dim,
    read_initial_descriptors,
)
from tfmet.training.contrastive.loop import (  # noqa: F401
    train,
)
from tfmet.training.contrastive.loss import (  # noqa: F401
    EPS,
    MARGIN,
    ContrastiveLoss,
    contrastive_loss,
    pair_squared_distances,
)
from tfmet.training.contrastive.optimizer import (  # noqa: F401
    TorchAdam,
    step_decay,
)
from tfmet.training.contrastive.trainer import (  # noqa: F401
    ContrastiveTrainer,
)
from tfmet.training.contrastive.workdir import (  # noqa: F401
    BACKBONE_WEIGHTS_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DESCRIPTOR_DIR,
    HISTORY_FILE,
    MODEL_DIR,
    MODEL_FILE,
    RESUMABLE_CHANGES,
    TENSORBOARD_DIR,
    TrainResult,
)
