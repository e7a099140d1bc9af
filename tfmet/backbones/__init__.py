"""Backbones: `tfmet.backbones.get(name, weights=...)` -> Keras model image -> feature map."""

# Importing these modules registers their backbones.
from tfmet.backbones import (  # noqa: F401
    efficientnet_lite,
    hub,
    huggingface,
    keras_applications,
    torchvision_resnet,
)
from tfmet.backbones.registry import (
    IMAGENET_CAFFE,
    IMAGENET_TORCH,
    SCALE_MINUS_ONE_ONE,
    SCALE_ZERO_ONE,
    BackboneSpec,
    Preprocessing,
    get,
    names,
    preprocessing,
    register,
    register_prefix,
    spec,
)

__all__ = [
    "IMAGENET_CAFFE",
    "IMAGENET_TORCH",
    "SCALE_MINUS_ONE_ONE",
    "SCALE_ZERO_ONE",
    "BackboneSpec",
    "Preprocessing",
    "get",
    "names",
    "preprocessing",
    "register",
    "register_prefix",
    "spec",
]
