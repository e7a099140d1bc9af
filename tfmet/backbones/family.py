"""Backbone families: what fine-tuning, reduced precision and checkpoint conversion need to know.

A family is the kind of network a set of registered backbones are (torchvision ResNets,
keras.applications ResNets, EfficientNet-Lite, TF-Hub modules, vision transformers). The module
that builds a family's backbones subclasses `Family`, registers one instance
(`tfmet.backbones.registry.register_family`) and names it in each `BackboneSpec.family`. The
rest of tfmet asks the registry (`registry.family_of(model)`, `registry.spec(name).family`) and
never guesses from layer names itself:

    blocks(model)                the blocks `trainable_blocks` counts, top first
    block_layers(model, block)   the Keras layers of one block
    set_trainable(model, ...)    the trainable-top rule: top blocks, top fraction, patterns
                                 (a family's own rule overrides `train_top`)
    float32_layers(model)        the layers that stay float32 under bfloat16
    reduced_precision            whether bfloat16 / float16 can be set at all
    converts_state_dicts         whether torch state dicts map onto it by layer name
    torch_path(layer name)       ... and under which torch module path
    convert(checkpoint, arch, out)   a converter of its own (e.g. ViT checkpoint directories)
    local_layer(model), local_probe(model)   where local features come from (spatial
                                 verification): a stride-16 map, or a ViT's patch tokens

A new family is one module: its builders, its `Family` subclass and its registrations (plus the
import in `tfmet/backbones/__init__.py` that registers it).
"""

import math
import re

import keras
import tensorflow as tf

BATCHNORM_MODES = ("frozen", "train")


class Family:
    """A family whose backbones are Keras models of named layers; override what differs.

    The defaults: no block structure (`trainable_blocks` is refused, `trainable_fraction`
    works), every layer follows the precision policy, no checkpoint converter.
    """

    name = "keras"
    reduced_precision = True
    converts_state_dicts = False
    variable_patterns = False  # whether `trainable_patterns` (variable names) applies

    def matches(self, model) -> bool:
        """Whether `model` is one of this family's (a model loaded from a file has no spec)."""
        return False

    def blocks(self, model) -> list[str]:
        """The blocks `trainable_blocks` counts, top first; [] when the family has none."""
        return []

    def block_layers(self, model, block) -> list:
        """The layers of `model` that belong to `block` (a name from `blocks`)."""
        raise ValueError(f"{self.name} backbones have no blocks. Received: block={block!r}")

    def set_trainable(
        self,
        model,
        trainable_blocks=0,
        trainable_fraction=0.0,
        trainable_patterns=(),
        batchnorm="frozen",
        name=None,
    ) -> list[str]:
        """Makes the chosen top part of `model` trainable and freezes the rest.

        Args:
          model: a backbone of this family.
          trainable_blocks: the top N `blocks`.
          trainable_fraction: the top ceil(f * L) of the L weight-holding layers, in model order.
          trainable_patterns: regular expressions of variable names (families that select
            variables by name: `variable_patterns`).
          batchnorm: "frozen": BatchNormalization layers stay frozen (inference mode) even in
            the chosen part; "train": those in the chosen part train.
          name: the backbone's registry name, for messages (default: the model's name).

        Returns:
          the names of the chosen blocks, layers or variables ([] when none of it trains).
        """
        check_trainable_options(trainable_blocks, trainable_fraction, trainable_patterns, batchnorm)
        name = name or model.name
        if trainable_patterns and not self.variable_patterns:
            raise ValueError(
                "trainable_patterns selects variables of hub modules; backbone "
                f"{name!r} is not one. Use trainable_blocks or trainable_fraction."
            )
        top = (int(trainable_blocks), float(trainable_fraction), tuple(trainable_patterns))
        return self.train_top(model, *top, batchnorm, name)

    def train_top(self, model, blocks, fraction, patterns, batchnorm, name) -> list[str]:
        """`set_trainable` after its checks; a family with its own rule overrides this."""
        if blocks:
            names = self.top_blocks(model, blocks, name)
            layers = [layer for block in names for layer in self.block_layers(model, block)]
        elif fraction:
            weighted = [layer for layer in model.layers if layer.weights]
            layers = weighted[len(weighted) - math.ceil(fraction * len(weighted)) :]
            names = [layer.name for layer in layers]
        else:
            layers, names = [], []
        chosen = {id(layer) for layer in layers}
        model.trainable = True
        for layer in model.layers:
            frozen_bn = batchnorm == "frozen" and isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = id(layer) in chosen and not frozen_bn
        return names

    def top_blocks(self, model, num_blocks, name=None) -> list[str]:
        """The top `num_blocks` of `blocks(model)`; ValueError when impossible."""
        name = name or model.name
        blocks = self.blocks(model)
        if not blocks:
            raise ValueError(
                f"trainable_blocks: no block structure known for backbone {name!r} "
                f"({self.name} family); use trainable_fraction"
            )
        if not 0 < num_blocks <= len(blocks):
            raise ValueError(
                f"trainable_blocks must be in [1, {len(blocks)}] for backbone {name!r}. "
                f"Received: trainable_blocks={num_blocks}"
            )
        return blocks[:num_blocks]

    def float32_layers(self, model) -> list:
        """The layers of `model` that stay float32 when the rest computes in bfloat16."""
        return []

    def local_layer(self, model):
        """The layer whose feature map gives local features (a stride-16 map), or None."""
        return None

    def local_probe(self, model):
        """`probe(images) -> (local map [B, h, w, C], cell size [2] in input pixels, output)`:
        the map local features are selected from and the backbone's output, from one pass.

        Default: a functional view of `model` that also returns `local_layer`'s output.
        """
        layer = self.local_layer(model)
        if layer is None:
            raise ValueError(
                f"Backbone {model.name!r} ({self.name} family): no local features (its family "
                "names no feature map for them)"
            )
        view = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])

        def probe(images):
            local, output = view(images, training=False)
            cell = tf.cast(tf.shape(images)[1:3] / tf.shape(local)[1:3], tf.float32)
            return local, cell, output

        return probe

    def torch_path(self, layer_name) -> str:
        """The torch module path of Keras layer `layer_name` (`converts_state_dicts` families)."""
        return layer_name

    def convert(self, checkpoint, arch, out) -> dict:
        """Converts `checkpoint` to tfmet weights `out` for backbone `arch`; returns metadata."""
        raise ValueError(
            f"Backbone {arch!r} ({self.name} family) has no checkpoint converter: give its "
            "weights as a Keras weights file"
        )


def check_trainable_options(trainable_blocks, trainable_fraction, trainable_patterns, batchnorm):
    """ValueError naming the option when they conflict or one is out of range."""
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


class PrefixBlocks(Family):
    """Blocks named by a prefix of layer names (`pattern`'s group 1), top first, then `rest`.

    `rest` ("stem", or "rest" for every layer outside a block) is a block of its own that
    holds `rest_layers`; `head_layers` (after the last block) belong to the top block.
    """

    pattern = None  # compiled regular expression; group(1) is the block name
    rest = "stem"
    rest_layers = ()
    head_layers = ()

    def matches(self, model) -> bool:
        return any(self.pattern.match(layer.name) for layer in getattr(model, "layers", ()))

    def blocks(self, model) -> list[str]:
        found = []
        for layer in model.layers:
            match = self.pattern.match(layer.name)
            if match and match.group(1) not in found:
                found.append(match.group(1))
        return found[::-1] + ([self.rest] if found else [])

    def block_layers(self, model, block) -> list:
        if block == self.rest:
            return [layer for layer in model.layers if self._in_rest(layer.name)]
        layers = [layer for layer in model.layers if self._block_of(layer.name) == block]
        if block == self.blocks(model)[0]:
            layers += [layer for layer in model.layers if layer.name in self.head_layers]
        return layers

    def _block_of(self, layer_name):
        match = self.pattern.match(layer_name)
        return match.group(1) if match else None

    def _in_rest(self, layer_name):
        return layer_name in self.rest_layers


def layers_through(model, prefix) -> list:
    """`model.layers` from the first up to the last whose name starts with `prefix`."""
    names = [layer.name for layer in model.layers]
    last = max(i for i, name in enumerate(names) if name.startswith(prefix))
    return model.layers[: last + 1]


class KerasBlockPrefixes(PrefixBlocks):
    """Any other Keras model: blocks are "block7a_"-style name prefixes (keras.applications
    EfficientNet, MobileNet-like models), then "rest" (every other layer); no blocks otherwise."""

    name = "keras"
    pattern = re.compile(r"^(block\d+[a-z])_")
    rest = "rest"

    def _in_rest(self, layer_name):
        return self._block_of(layer_name) is None


KERAS = KerasBlockPrefixes()
