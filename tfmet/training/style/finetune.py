"""Which part of a backbone trains: the top N blocks, the top fraction of layers, or name patterns.

Rules, by backbone:

- torchvision-compatible ResNets ("resnet_tiny", "resnet50", ..., layer names "layer4.2.conv1"):
  blocks are "layer4.2", "layer4.1", ..., then "stem" (`tfmet.backbones.torchvision_resnet`).
- keras.applications ResNets ("keras_resnet50", layer names "conv5_block3_1_conv"): blocks are
  "conv5_block3", ..., "conv2_block1", then "stem" (`tfmet.backbones.keras_applications.blocks`).
- other Keras models with block-prefixed names (EfficientNet "block7a_..."): blocks are the name
  prefixes in reverse order of appearance, then "rest" (every other layer).
- TF-Hub modules ("hub:..."): variables are selected by regular expressions on their names
  (`trainable_patterns`); `trainable_blocks` picks the last N "blockB/unit_U" groups found in
  the names (TF-Slim ResNets) when there are any.
- `trainable_fraction` f: the top ceil(f * L) of the L weight-holding layers in model order
  (RASTA's "last N layers"), for any Keras backbone; for hub modules, of the variables.

BatchNorm is explicit (`batchnorm`):

- "frozen" (default): every BatchNormalization layer keeps its gamma/beta and moving statistics,
  and the classifier calls the backbone with `training=False`, so batch statistics are never used.
  This is the standard way to fine-tune a pretrained trunk on small batches.
- "train": BatchNormalization layers inside the unfrozen blocks learn gamma/beta and update their
  moving statistics from batch statistics; those in frozen blocks stay in inference mode. (A hub
  module receives one `training` flag for the whole module: all its BN layers use batch
  statistics then.)
"""

import math
import re

import keras

from tfmet.backbones import hub, keras_applications, torchvision_resnet
from tfmet.backbones.vit import VisionTransformer

BATCHNORM_MODES = ("frozen", "train")
_BN_NAME = re.compile(
    r"(batch_?norm|/bn\d*/|/bn\d*$|_bn$|_bn_|\.bn\d*$|gamma|beta|moving_)", re.IGNORECASE
)
_TORCH_BLOCK = re.compile(r"^layer\d+\.\d+\.")
_RESNET_BLOCK = re.compile(r"^conv\d+_block\d+_")
_KERAS_BLOCK = re.compile(r"^(block\d+[a-z])_")
_HUB_BLOCK = re.compile(r"(block\d+/unit_\d+)")


def _layers_with_weights(model):
    return [layer for layer in model.layers if layer.weights]


def _is_batchnorm(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def _is_hub(backbone):
    return any(isinstance(layer, hub.HubModule) for layer in backbone.layers)


def _is_torchvision_resnet(model):
    return any(_TORCH_BLOCK.match(layer.name) for layer in model.layers)


def _is_keras_resnet(model):
    return any(_RESNET_BLOCK.match(layer.name) for layer in model.layers)


def keras_blocks(model):
    """Block prefixes of "block7a_"-style layer names, top first, then "rest"."""
    order = []
    for layer in model.layers:
        match = _KERAS_BLOCK.match(layer.name)
        if match and match.group(1) not in order:
            order.append(match.group(1))
    return order[::-1] + (["rest"] if order else [])


def _block_layers(model, block):
    if _is_torchvision_resnet(model):
        return torchvision_resnet.block_layers(model, block)
    if _is_keras_resnet(model):
        return keras_applications.block_layers(model, block)
    if block == "rest":
        return [layer for layer in model.layers if not _KERAS_BLOCK.match(layer.name)]
    return [layer for layer in model.layers if layer.name.startswith(block + "_")]


def backbone_blocks(backbone):
    """The blocks `trainable_blocks` counts, top first ([] when no rule applies)."""
    if _is_torchvision_resnet(backbone):
        return torchvision_resnet.blocks(backbone)
    if _is_hub(backbone):
        layer = hub.hub_layer(backbone)
        order = []
        for variable in layer.weights:
            match = _HUB_BLOCK.search(layer.variable_name(variable))
            if match and match.group(1) not in order:
                order.append(match.group(1))
        return sorted(order, key=_hub_block_key, reverse=True)
    if _is_keras_resnet(backbone):
        return keras_applications.blocks(backbone)
    return keras_blocks(backbone)


def _hub_block_key(name):
    block, unit = re.match(r"block(\d+)/unit_(\d+)", name).groups()
    return int(block), int(unit)


def set_trainable(
    classifier,
    trainable_blocks=0,
    trainable_fraction=0.0,
    trainable_patterns=(),
    batchnorm="frozen",
):
    """Freezes the classifier's backbone except the chosen top part; the head always trains.

    Args:
      classifier: a `StyleClassifier`; the backbone's layer names select the block rule.
      trainable_blocks: number of top blocks to unfreeze.
      trainable_fraction: fraction of top weight layers (or hub variables) to unfreeze.
      trainable_patterns: regular expressions of hub variable names (hub backbones only).
      batchnorm: "frozen" or "train" (see the module docstring).

    Returns:
      the names of the unfrozen blocks / layers / hub variables (empty for head-only training).

    Raises:
      ValueError: conflicting or out-of-range options, or a rule the backbone does not support.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}. Received: {batchnorm!r}")
    chosen = [bool(trainable_blocks), bool(trainable_fraction), bool(trainable_patterns)]
    if sum(chosen) > 1:
        raise ValueError(
            "Choose one of trainable_blocks, trainable_fraction, trainable_patterns. Received: "
            f"trainable_blocks={trainable_blocks}, trainable_fraction={trainable_fraction}, "
            f"trainable_patterns={list(trainable_patterns)}"
        )
    if not 0.0 <= float(trainable_fraction) <= 1.0:
        raise ValueError(
            "trainable_fraction must be in [0, 1]. "
            f"Received: trainable_fraction={trainable_fraction}"
        )
    backbone, name = classifier.backbone, classifier.backbone_name
    classifier.batchnorm = batchnorm
    classifier.trainable = True
    classifier.head.trainable = True
    classifier.pool.trainable = True
    if _is_hub(backbone):
        return _set_hub_trainable(
            backbone, name, trainable_blocks, trainable_fraction, trainable_patterns, batchnorm
        )
    if isinstance(backbone, VisionTransformer) and not trainable_patterns:
        return set_vit_trainable(backbone, trainable_blocks, trainable_fraction)
    if trainable_patterns:
        raise ValueError(
            f"trainable_patterns selects variables of hub modules; backbone {name!r} is not one. "
            "Use trainable_blocks or trainable_fraction."
        )
    backbone.trainable = True
    layers = []
    if trainable_blocks:
        names = _top_blocks(
            backbone,
            trainable_blocks,
            f"backbone {name!r}",
            f"no block structure known for backbone {name!r}; use trainable_fraction",
        )
        layers = [layer for b in names for layer in _block_layers(backbone, b)]
    elif trainable_fraction:
        weighted = _layers_with_weights(backbone)
        count = math.ceil(float(trainable_fraction) * len(weighted))
        layers = weighted[len(weighted) - count :]
        names = [layer.name for layer in layers]
    else:
        names = []
    unfrozen = {id(layer) for layer in layers}
    for layer in backbone.layers:
        trainable = id(layer) in unfrozen
        if _is_batchnorm(layer) and batchnorm == "frozen":
            trainable = False
        layer.trainable = trainable
    return names


def set_vit_trainable(backbone, trainable_blocks=0, trainable_fraction=0.0):
    """A `VisionTransformer`: the top blocks and the final norm, or the top fraction of its
    weight-holding units (embeddings, each block, final norm, in model order); returns names."""
    if trainable_blocks or not trainable_fraction:
        return backbone.set_trainable_blocks(int(trainable_blocks))
    units = [backbone.backbone.embeddings, *backbone.blocks, backbone.final_norm]
    count = math.ceil(float(trainable_fraction) * len(units))
    backbone.set_trainable_blocks(0)
    chosen = units[len(units) - count :]
    for unit in chosen:
        unit.trainable = True
    backbone.backbone.encoder.trainable = any(block in chosen for block in backbone.blocks)
    for block in backbone.blocks:  # the encoder's flag reaches every block: set them again
        block.trainable = block in chosen
    return [unit.name for unit in chosen][::-1]


def _top_blocks(backbone, trainable_blocks, what, no_blocks):
    """The names of the top `trainable_blocks` blocks of `backbone` (ValueError if impossible)."""
    blocks = backbone_blocks(backbone)
    if not blocks:
        raise ValueError(f"trainable_blocks: {no_blocks}")
    if not 0 < trainable_blocks <= len(blocks):
        raise ValueError(
            f"trainable_blocks must be in [1, {len(blocks)}] for {what}. "
            f"Received: trainable_blocks={trainable_blocks}"
        )
    return blocks[:trainable_blocks]


def _set_hub_trainable(
    backbone, name, trainable_blocks, trainable_fraction, trainable_patterns, batchnorm
):
    layer = hub.hub_layer(backbone)
    backbone.trainable = True
    layer.trainable = True
    if trainable_blocks:
        chosen = _top_blocks(
            backbone,
            trainable_blocks,
            repr(name),
            f"the variables of hub module {name!r} show no block/unit structure; use "
            "trainable_patterns",
        )
        patterns = [re.escape(b) + "/" for b in chosen]
    elif trainable_fraction:
        names = layer.set_trainable_patterns(None)  # every variable the module lets train
        candidates = (
            [n for n in names if not _BN_NAME.search(n)] if batchnorm == "frozen" else names
        )
        count = math.ceil(float(trainable_fraction) * len(candidates))
        patterns = ["^" + re.escape(n) + "$" for n in candidates[len(candidates) - count :]]
    else:
        patterns = list(trainable_patterns)
    selected = layer.set_trainable_patterns(patterns)
    if batchnorm == "frozen":
        keep = [n for n in selected if not _BN_NAME.search(n)]
        if len(keep) != len(selected):
            selected = layer.set_trainable_patterns(["^" + re.escape(n) + "$" for n in keep])
    if not selected:
        backbone.trainable = False
    return selected
