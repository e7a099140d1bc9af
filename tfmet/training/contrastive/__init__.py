"""Contrastive fine-tuning of the Embedder on mined Met pairs (siamese, single scale).

The recipe of the Met reference (Ypsilantis et al., 2021), see docs/contrastive.md:

- loss on L2-normalised embeddings (`loss.contrastive_loss`, margin `config.MARGIN` = 1.8):
  mean 0.5 * [y d^2 + (1 - y) relu(margin - sqrt(d^2 + eps))^2], y = 1 for a positive pair;
- both images of a pair go through the same Embedder (shared weights), in inference mode:
  BatchNorm keeps its ImageNet moving statistics (the reference's `BatchNorm.eval()`), while
  gamma/beta, the convolutions, GeM p and the projector are trained;
- Adam with L2 weight decay added to the gradient (PyTorch `Adam(weight_decay=...)`, not AdamW),
  step decay of the learning rate per epoch, gradient accumulation over `vbsizemul` sub-batches.

One module each (the package exports nothing: names are imported from their module):

    config.py     default_config() (the reference's settings), check_config, AugmentConfig,
                  MARGIN (no TensorFlow: a program checks its config before TensorFlow loads)
    mining.py     pair mining, PAIR_TYPES (numpy only)
    augment.py    training augmentation on the TF graph (Augmenter)
    loss.py       contrastive_loss, ContrastiveLoss, pair_squared_distances, EPS
    optimizer.py  TorchAdam, step_decay
    trainer.py    build_embedder (the config's Embedder), ContrastiveTrainer: the model,
                  optimizer and compiled steps
    data.py       Met training data, initial descriptors, projector init from PCA, kNN validation
    workdir.py    the run directory: CHECKPOINT_DIR, MODEL_FILE, ..., TrainResult
    loop.py       train: the whole resumable loop (mining, pairs, steps, validation,
                  TensorBoard, checkpoints)

A program reads `mining.PAIR_TYPES` (and validates its input) before importing the modules that
need TensorFlow, so bad input fails before TensorFlow loads.
"""
