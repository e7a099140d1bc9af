"""keras.applications ResNets as backbones (never downloads weights).

"keras_resnet50", "keras_resnet101", "keras_resnet152" (ResNet v1, caffe preprocessing: BGR,
ImageNet mean subtracted, `IMAGENET_CAFFE`) and "keras_resnet50v2" (pre-activation ResNet v2,
inputs in [-1, 1], `SCALE_MINUS_ONE_ONE`), built with `include_top=False` on inputs of any size.
The v1 models end at conv5's last block output, the v2 model at its final BN + ReLU
("post_relu"). Both have stride 32 and 2048 channels.

`weights` is None (random initialisation) or a local file: a Keras 3 `.weights.h5` saved from
the same builder, or the legacy Keras `.h5` weight file keras.applications itself would download
(`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`, ...), copied to this machine by hand.
"""

import re

import keras

from tfmet.backbones import family, registry
from tfmet.backbones.weights import load_weights

_APPLICATIONS = {
    "keras_resnet50": ("ResNet50", registry.IMAGENET_CAFFE, "keras.applications ResNet50 (v1)"),
    "keras_resnet101": ("ResNet101", registry.IMAGENET_CAFFE, "keras.applications ResNet101 (v1)"),
    "keras_resnet152": ("ResNet152", registry.IMAGENET_CAFFE, "keras.applications ResNet152 (v1)"),
    "keras_resnet50v2": (
        "ResNet50V2",
        registry.SCALE_MINUS_ONE_ONE,
        "keras.applications ResNet50V2 (pre-activation)",
    ),
}


def build(name: str, weights=None) -> keras.Model:
    """keras.applications model `name` (a key of the registry) without its classifier."""
    if name not in _APPLICATIONS:
        raise ValueError(
            f"Unknown keras.applications backbone {name!r}; valid: {sorted(_APPLICATIONS)}"
        )
    constructor = getattr(keras.applications, _APPLICATIONS[name][0])
    model = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
    if weights is not None:
        load_weights(model, weights)
    return model


class KerasResNet(family.PrefixBlocks):
    """keras.applications ResNets: blocks "conv5_block3", ..., "conv2_block1", then "stem"
    (conv1_*, pool1_*); the top block includes ResNetV2's final BN + ReLU."""

    name = "keras_resnet"
    pattern = re.compile(r"^(conv\d+_block\d+)_")
    head_layers = ("post_bn", "post_relu")

    def _in_rest(self, layer_name):
        return layer_name.startswith(("conv1_", "pool1_"))

    def local_layer(self, model):
        """The output of conv4's last block (stride 16)."""
        return [layer.name for layer in model.layers if layer.name.startswith("conv4_")][-1]


FAMILY = registry.register_family(KerasResNet())


def _builder(name: str):
    def builder(weights=None):
        return build(name, weights=weights)

    builder.__doc__ = f"Builds {name}; `weights` is None (random) or a local weights file."
    return builder


for _name, (_, _preprocessing, _description) in _APPLICATIONS.items():
    registry.register(
        registry.BackboneSpec(
            name=_name,
            builder=_builder(_name),
            preprocessing=_preprocessing,
            description=_description,
            family=FAMILY,
        )
    )
