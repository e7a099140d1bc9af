"""Which part of a style classifier's backbone trains: the top N blocks, the top fraction of
layers, or name patterns. The rule is the backbone's family's (`tfmet.backbones.family`):

- torchvision-compatible ResNets ("resnet50", layer names "layer4.2.conv1"): blocks "layer4.2",
  ..., "layer1.0", then "stem".
- keras.applications ResNets ("keras_resnet50", "conv5_block3_1_conv"): blocks "conv5_block3",
  ..., "conv2_block1", then "stem"; ResNetV2's final BN belongs to the top block.
- EfficientNet-Lite ("efficientnet_lite0", "blocks.15.project_conv"): blocks "blocks.15", ...,
  "blocks.0", then "stem"; the head conv belongs to the top block.
- vision transformers: the encoder blocks, top first; the final norm trains with them.
- TF-Hub modules ("hub:..."): variables are selected by regular expressions on their names
  (`trainable_patterns`); `trainable_blocks` picks the last N "blockB/unit_U" groups found in
  the names (TF-Slim ResNets) when there are any.
- other Keras models with block-prefixed names (EfficientNet "block7a_..."): the name prefixes in
  reverse order of appearance, then "rest" (every other layer).
- `trainable_fraction` f: the top ceil(f * L) of the L weight-holding layers in model order
  (RASTA's "last N layers"); for hub modules, of the variables; for ViTs, of the units
  (embeddings, blocks, final norm).

BatchNorm is explicit (`batchnorm`):

- "frozen" (default): every BatchNormalization layer keeps its gamma/beta and moving statistics,
  and the classifier calls the backbone with `training=False`, so batch statistics are never used.
  This is the standard way to fine-tune a pretrained trunk on small batches.
- "train": BatchNormalization layers inside the unfrozen blocks learn gamma/beta and update their
  moving statistics from batch statistics; those in frozen blocks stay in inference mode. (A hub
  module receives one `training` flag for the whole module: all its BN layers use batch
  statistics then.)
"""

from tfmet.backbones import registry
from tfmet.backbones.family import check_trainable_options


def set_trainable(
    classifier,
    trainable_blocks=0,
    trainable_fraction=0.0,
    trainable_patterns=(),
    batchnorm="frozen",
):
    """Freezes the classifier's backbone except the chosen top part; the head always trains.

    Args:
      classifier: a `StyleClassifier`; its backbone's family (`registry.family_of`) gives the
        rule.
      trainable_blocks: number of top blocks to unfreeze.
      trainable_fraction: fraction of top weight layers (or hub variables) to unfreeze.
      trainable_patterns: regular expressions of hub variable names (hub backbones only).
      batchnorm: "frozen" or "train" (see the module docstring).

    Returns:
      the names of the unfrozen blocks / layers / hub variables (empty for head-only training).

    Raises:
      ValueError: conflicting or out-of-range options, or a rule the backbone does not support.
    """
    check_trainable_options(trainable_blocks, trainable_fraction, trainable_patterns, batchnorm)
    backbone = classifier.backbone
    classifier.batchnorm = batchnorm
    classifier.trainable = True
    classifier.head.trainable = True
    classifier.pool.trainable = True
    return registry.family_of(backbone).set_trainable(
        backbone,
        trainable_blocks=trainable_blocks,
        trainable_fraction=trainable_fraction,
        trainable_patterns=trainable_patterns,
        batchnorm=batchnorm,
        name=classifier.backbone_name,
    )
