"""TF-Hub image modules as Keras 3 backbones: "hub:<handle or local path>[#options]".

A handle is anything `tensorflow_hub.resolve` accepts: a tfhub.dev / Kaggle URL (downloaded once
into TFHUB_CACHE_DIR, then used offline from there), a URL of a .tar.gz, or a local directory
holding a TF2 SavedModel (reusable-SavedModel API: `__call__(inputs, training=...)`, `variables`,
`trainable_variables`, `regularization_losses`) or a TF1 hub module (use its `signature`).

The module becomes a Keras 3 layer, `tfmet.backbones.hub_module.HubModule`, whose weights are the
module's own variables; which ones train is chosen by regular expressions on their names
(`trainable_patterns`). This module owns the names: parsing "hub:..." and its options, `build`,
the registry entries (`resolve_name`, `register_module`) and the fine-tuning family
(`HubFamily`).

Options can be given in the backbone name after '#', as `key=value` pairs joined by '&' (values
are taken literally, so a regular expression may contain anything but '&'):

    hub:/models/bit_m_r50x1#output=feature_map&preprocessing=zero_one&trainable=block4
    hub:https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/1#signature=image_feature_vector&output=resnet_v1_50/block4

  output         the key of the module's output dict to return (the spatial feature map);
                 required when the module returns a dict.
  signature      call `signatures[<name>]` instead of `__call__` (TF1 hub modules).
  preprocessing  zero_one (default: hub image modules take [0, 1] RGB), minus_one_one,
                 imagenet_torch or imagenet_caffe.
  trainable      a variable-name pattern to make trainable; repeat the key for several.
                 Without it every variable the module marks trainable is trainable.

The same options are keyword arguments of `build` / `tfmet.backbones.get("hub:...", ...)`
(keyword arguments win over name options), and `register_module` gives a module a plain name.
"""

import math
import re
from collections.abc import Sequence

import keras

from tfmet.backbones import family, registry
from tfmet.backbones.hub_module import HubModule
from tfmet.backbones.weights import load_weights

PREFIX = "hub:"

PREPROCESSING = {
    "zero_one": registry.SCALE_ZERO_ONE,
    "minus_one_one": registry.SCALE_MINUS_ONE_ONE,
    "imagenet_torch": registry.IMAGENET_TORCH,
    "imagenet_caffe": registry.IMAGENET_CAFFE,
}
_NAME_OPTIONS = ("output", "signature", "preprocessing", "trainable")


def parse_name(name: str) -> tuple[str, dict]:
    """Splits "hub:<handle>[#k=v&k=v]" into the handle and the options dict.

    `trainable` may repeat and is returned as a list under "trainable".
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"Hub backbone names start with {PREFIX!r}. Received: name={name!r}")
    handle, _, option_text = name[len(PREFIX) :].partition("#")
    if not handle:
        raise ValueError(f"Empty hub handle. Received: name={name!r}")
    options: dict = {}
    for item in filter(None, option_text.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in _NAME_OPTIONS:
            raise ValueError(
                f"Bad hub option {item!r} in {name!r}; expected key=value with key in "
                f"{list(_NAME_OPTIONS)}."
            )
        if key == "trainable":
            options.setdefault("trainable", []).append(value)
        else:
            options[key] = value
    return handle, options


def _preprocessing(key: str) -> registry.Preprocessing:
    if key not in PREPROCESSING:
        raise ValueError(
            f"Unknown hub preprocessing {key!r}; valid: {sorted(PREPROCESSING)}. "
            f"Received: preprocessing={key!r}"
        )
    return PREPROCESSING[key]


def build(handle: str, weights=None, name=None, **module_options) -> keras.Model:
    """A Keras model images [B, H, W, 3] -> the module's output (see `HubModule`).

    `weights` is None (the module's own weights) or a `.weights.h5` file saved from a model
    built the same way (e.g. after fine-tuning). `module_options` are `HubModule`'s:
    `output_key`, `signature`, `trainable_patterns`, `arguments`.
    """
    images = keras.Input((None, None, 3), name="images")
    layer = HubModule(handle, name="hub_module", **module_options)
    model = keras.Model(images, layer(images), name=name or "hub")
    if weights is not None:
        load_weights(model, weights)
    return model


def hub_layer(model: keras.Model) -> HubModule:
    """The `HubModule` inside a model built by `build`."""
    for layer in model.layers:
        if isinstance(layer, HubModule):
            return layer
    raise ValueError(f"Model {model.name!r} contains no HubModule layer.")


_BLOCK_UNIT = re.compile(r"(block(\d+)/unit_(\d+))")
# Variable names of BatchNorm parameters and statistics in TF-Slim / TF2 modules.
_BN_NAME = re.compile(
    r"(batch_?norm|/bn\d*/|/bn\d*$|_bn$|_bn_|\.bn\d*$|gamma|beta|moving_)", re.IGNORECASE
)


class HubFamily(family.Family):
    """TF-Hub modules: variables are chosen by regular expressions on their names
    (`trainable_patterns`); `trainable_blocks` counts the "blockB/unit_U" groups of the names
    (TF-Slim ResNets); `trainable_fraction` the variables the module lets train, in order. A
    SavedModel runs in the dtype it was saved with: no reduced precision."""

    name = "hub"
    reduced_precision = False
    variable_patterns = True

    def matches(self, model):
        layers = getattr(model, "_flatten_layers", None)
        return layers is not None and any(
            isinstance(layer, HubModule) for layer in layers(include_self=True, recursive=True)
        )

    def blocks(self, model):
        layer = hub_layer(model)
        found = {}
        for variable in layer.weights:
            match = _BLOCK_UNIT.search(layer.variable_name(variable))
            if match:
                found[match.group(1)] = (int(match.group(2)), int(match.group(3)))
        return sorted(found, key=found.get, reverse=True)

    def train_top(self, model, blocks, fraction, patterns, batchnorm, name):
        """Returns the names of the variables that train. A hub module receives one `training`
        flag, so with batchnorm="train" all its BatchNorms use batch statistics."""
        layer = hub_layer(model)
        model.trainable = True
        layer.trainable = True
        if blocks:
            if not self.blocks(model):
                raise ValueError(
                    f"trainable_blocks: the variables of hub module {name!r} show no "
                    "block/unit structure; use trainable_patterns"
                )
            chosen = self.top_blocks(model, blocks, name)
            patterns = [re.escape(block) + "/" for block in chosen]
        elif fraction:
            names = layer.set_trainable_patterns(None)  # every variable the module lets train
            if batchnorm == "frozen":
                names = [n for n in names if not _BN_NAME.search(n)]
            count = math.ceil(fraction * len(names))
            patterns = ["^" + re.escape(n) + "$" for n in names[len(names) - count :]]
        selected = layer.set_trainable_patterns(list(patterns))
        if batchnorm == "frozen":
            keep = [n for n in selected if not _BN_NAME.search(n)]
            if len(keep) != len(selected):
                selected = layer.set_trainable_patterns(["^" + re.escape(n) + "$" for n in keep])
        if not selected:
            model.trainable = False
        return selected


FAMILY = registry.register_family(HubFamily())


def _spec(
    name: str,
    handle: str,
    output_key=None,
    signature=None,
    preprocessing: registry.Preprocessing = registry.SCALE_ZERO_ONE,
    trainable_patterns: Sequence[str] | None = None,
    description: str = "",
) -> registry.BackboneSpec:
    defaults = {
        "output_key": output_key,
        "signature": signature,
        "trainable_patterns": trainable_patterns,
    }

    def builder(weights=None, **kwargs):
        unknown = set(kwargs) - {"output_key", "signature", "trainable_patterns", "arguments"}
        if unknown:
            raise TypeError(f"Unknown hub backbone arguments: {sorted(unknown)}")
        return build(handle, weights=weights, name="hub", **{**defaults, **kwargs})

    return registry.BackboneSpec(
        name=name,
        builder=builder,
        preprocessing=preprocessing,
        description=description or f"TF-Hub module {handle}",
        family=FAMILY,
    )


def resolve_name(name: str) -> registry.BackboneSpec:
    """The registry resolver for "hub:..." names."""
    handle, options = parse_name(name)
    return _spec(
        name,
        handle,
        output_key=options.get("output"),
        signature=options.get("signature"),
        preprocessing=_preprocessing(options.get("preprocessing", "zero_one")),
        trainable_patterns=options.get("trainable"),
    )


def register_module(
    name: str,
    handle: str,
    output_key=None,
    signature=None,
    preprocessing: str = "zero_one",
    trainable_patterns: Sequence[str] | None = None,
    description: str = "",
) -> registry.BackboneSpec:
    """Registers hub module `handle` under the plain backbone name `name`."""
    return registry.register(
        _spec(
            name,
            handle,
            output_key=output_key,
            signature=signature,
            preprocessing=_preprocessing(preprocessing),
            trainable_patterns=trainable_patterns,
            description=description,
        )
    )


registry.register_prefix(PREFIX, resolve_name)
