"""Backbone registry: name -> Keras model from images [B, H, W, 3] to the last conv feature map.

Every backbone states its input preprocessing (`Preprocessing`), applied by the caller (the
`Embedder`, the data pipelines) to float RGB images in [0, 255].
"""

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from tfmet.backbones.family import KERAS, Family


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation `(x - mean) / std` in pixel units, optionally after RGB -> BGR.

    Attributes:
      mean: three channel means, in the units of a [0, 255] image and in the channel order used
        after the optional swap.
      std: three channel standard deviations, likewise.
      bgr: whether to reverse the channel order first (caffe-style keras.applications models).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    def __call__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        if self.bgr:
            images = images[..., ::-1]
        return (images - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def get_config(self):
        return {"mean": list(self.mean), "std": list(self.std), "bgr": self.bgr}

    @classmethod
    def from_config(cls, config):
        return cls(tuple(config["mean"]), tuple(config["std"]), bool(config.get("bgr", False)))


# torchvision / timm ImageNet statistics: x/255 normalised by mean (0.485, 0.456, 0.406) and
# std (0.229, 0.224, 0.225), written in [0, 255] units.
IMAGENET_TORCH = Preprocessing(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
# keras.applications "caffe" mode (ResNet50/101/152 v1): BGR, mean subtraction only.
IMAGENET_CAFFE = Preprocessing(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), bgr=True)
# keras.applications "tf" mode (ResNetV2) and TF-Hub image modules: [-1, 1].
SCALE_MINUS_ONE_ONE = Preprocessing(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5))
# TF-Hub image modules that take [0, 1] inputs.
SCALE_ZERO_ONE = Preprocessing(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    Attributes:
      name: registry name.
      builder: `builder(weights=None, **kwargs) -> keras.Model`; `weights` is None (random
        initialisation) or a local weights file.
      preprocessing: the input normalisation the weights expect.
      description: one line for listings.
      pooling: the descriptor pooling that suits the backbone's output: "gem" for a feature map
        [B, h, w, C], "cls" for a token sequence [B, T, C] (vision transformers).
      weights_file: for backbones whose builder loads weights by itself when `weights` is None
        (a checkpoint directory), `weights_file()` -> the file that identifies those weights.
      family: what fine-tuning, reduced precision and conversion need to know about the
        backbone (`tfmet.backbones.family`); the generic Keras family by default.
    """

    name: str
    builder: Callable[..., keras.Model]
    preprocessing: Preprocessing
    description: str = ""
    pooling: str = "gem"
    weights_file: Callable[[], str] | None = None
    family: Family = KERAS


_REGISTRY: dict[str, BackboneSpec] = {}
_DYNAMIC_PREFIXES: dict[str, Callable[[str], BackboneSpec]] = {}
_FAMILIES: list[Family] = []


def register(spec: BackboneSpec) -> BackboneSpec:
    """Adds `spec` to the registry; re-registering a name replaces it."""
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, resolver: Callable[[str], BackboneSpec]) -> None:
    """Names starting with `prefix` (e.g. "hub:") are resolved by `resolver(name)`."""
    _DYNAMIC_PREFIXES[prefix] = resolver


def register_family(family: Family) -> Family:
    """Adds `family` to those `family_of` asks; re-registering a name replaces it."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
    return family


def family_of(model) -> Family:
    """The registered family `model` belongs to (`Family.matches`); the generic Keras family
    when none claims it. Works on models loaded from files, which keep no registry name."""
    for family in _FAMILIES:
        if family.matches(model):
            return family
    return KERAS


def names() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> BackboneSpec:
    """Looks `name` up; an unknown name raises ValueError listing the valid ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, resolver in _DYNAMIC_PREFIXES.items():
        if name.startswith(prefix):
            return resolver(name)
    valid = ", ".join(names())
    prefixes = ", ".join(f"{p}<handle or path>" for p in sorted(_DYNAMIC_PREFIXES))
    raise ValueError(
        f"Unknown backbone {name!r}. Valid names: {valid}"
        + (f"; or {prefixes}" if prefixes else "")
    )


def get(name: str, weights=None, **kwargs) -> keras.Model:
    """Builds backbone `name` (random weights if `weights` is None, else a local weights file)."""
    return spec(name).builder(weights=weights, **kwargs)


def preprocessing(name: str) -> Preprocessing:
    """The input normalisation of backbone `name`."""
    return spec(name).preprocessing
