"""torchvision-compatible ResNet / ResNeXt trunks in Keras 3.

The models reproduce torchvision's `ResNet` (v1.5: the stride sits in the 3x3 conv of the
bottleneck) up to and including `layer4` (`children()[:-2]`: no avgpool, no fc), with the same
layer order, shapes and numerics, so that converted PyTorch checkpoints (torchvision ImageNet,
SWSL / WSL, SwAV, SIN, the Met contrastive models) load 1:1 and give the same feature maps:

- torch pads symmetrically; Keras 'same' with stride 2 pads only on the bottom/right. Every conv
  and the max-pool is therefore an explicit `ZeroPadding2D` followed by a 'valid' op. Zero
  padding before the max-pool equals torch's -inf padding because it follows a ReLU.
- BatchNormalization uses epsilon 1e-5 and momentum 0.9 (torch's momentum 0.1 is the weight of
  the new batch statistic).
- ResNeXt's 3x3 convs are `GroupedConv2D` (a Conv2D with `groups`, run as TF's native grouped
  convolution instead of Keras's XLA path; see the class).

Naming convention (what a checkpoint converter relies on): every Keras layer that holds weights
is named after its torchvision module path, e.g. "conv1", "bn1", "layer1.0.conv1",
"layer1.0.bn1", "layer2.0.downsample.0" (the 1x1 conv), "layer2.0.downsample.1" (its BN). The
torch state_dict entries map as follows:

    <path>.weight  (conv, OIHW; grouped: O, I/groups, H, W)  -> layer <path> kernel, HWIO
                                                                (np.transpose(w, (2, 3, 1, 0)))
    <path>.weight / .bias (BN)                               -> gamma / beta
    <path>.running_mean / .running_var (BN)                  -> moving_mean / moving_variance
    <path>.num_batches_tracked                               -> (dropped)

Convs have no bias, as in torchvision. Weightless helper layers are named "<path>.pad",
"<block>.relu1" etc. and never collide with module paths.

Input: float images [B, H, W, 3] (any H, W) normalised with `IMAGENET_TORCH`. Output: the
layer4 feature map [B, ceil(H/32), ceil(W/32), C] (C = 512 for BasicBlock nets, 2048 for
bottleneck nets).
"""

import dataclasses
import math
import re

import keras
import tensorflow as tf

from tfmet.backbones import family, registry
from tfmet.backbones.weights import load_weights

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """One torchvision ResNet / ResNeXt architecture.

    Attributes:
      block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+, ResNeXt).
      layers: number of blocks in each of the four stages.
      groups: cardinality of the 3x3 convs (ResNeXt); 1 for ResNet.
      width_per_group: torchvision's `width_per_group` (64 for ResNet; 4, 8 or 16 for ResNeXt).
      planes: the per-stage `planes` (64, 128, 256, 512 in every torchvision model); the stem
        has `planes[0]` channels.
    """

    block: str
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    planes: tuple[int, int, int, int] = (64, 128, 256, 512)

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def output_channels(self) -> int:
        return self.planes[-1] * self.expansion


CONFIGS: dict[str, ResNetConfig] = {
    "resnet_tiny": ResNetConfig("basic", (1, 1, 1, 1), planes=(8, 16, 32, 64)),
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
    "resnext50_32x4d": ResNetConfig("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x4d": ResNetConfig("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetConfig("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_32x16d": ResNetConfig("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=16),
}

_DESCRIPTIONS = {
    "resnet_tiny": "tiny BasicBlock ResNet (widths 8/16/32/64, one block per stage) for tests",
    "resnet18": "torchvision ResNet-18 trunk (512 channels, stride 32)",
    "resnet34": "torchvision ResNet-34 trunk (512 channels, stride 32)",
    "resnet50": "torchvision ResNet-50 v1.5 trunk (2048 channels, stride 32)",
    "resnet101": "torchvision ResNet-101 v1.5 trunk (2048 channels, stride 32)",
    "resnext50_32x4d": "torchvision ResNeXt-50 32x4d trunk (2048 channels, stride 32)",
    "resnext101_32x4d": "ResNeXt-101 32x4d trunk, SWSL layout (2048 channels, stride 32)",
    "resnext101_32x8d": "torchvision ResNeXt-101 32x8d trunk (2048 channels, stride 32)",
    "resnext101_32x16d": "ResNeXt-101 32x16d trunk, WSL layout (2048 channels, stride 32)",
}


@keras.saving.register_keras_serializable(package="tfmet")
class GroupedConv2D(keras.layers.Conv2D):
    """Conv2D whose grouped convolution runs forward as TensorFlow's native grouped conv.

    Keras 3 routes every grouped convolution through an XLA-compiled function, which
    recompiles for each new input shape (every image size of a multi-scale extraction) and
    runs slower than TF's native kernel on CPU with oneDNN. TF 2.20 runs grouped
    `tf.nn.conv2d` natively forward, but its CPU gradient kernels reject groups unless oneDNN
    is on; so the forward pass is native and the gradient is that of Keras's own (XLA)
    formulation, exactly what a plain Conv2D would train with. Weights and config are those
    of Conv2D.
    """

    def convolution_op(self, inputs, kernel):
        native = keras.backend.backend() == "tensorflow" and self.data_format == "channels_last"
        if self.groups == 1 or not native:
            return super().convolution_op(inputs, kernel)
        keras_convolution = super().convolution_op
        strides = (1, *self.strides, 1)
        dilations = (1, *self.dilation_rate, 1)
        padding = self.padding.upper()

        @tf.custom_gradient
        def convolution(x, k):
            y = tf.nn.conv2d(x, k, strides, padding, data_format="NHWC", dilations=dilations)

            def gradient(dy):
                with tf.GradientTape() as tape:
                    tape.watch([x, k])
                    reference = keras_convolution(x, k)
                return tape.gradient(reference, [x, k], output_gradients=dy)

            return y, gradient

        return convolution(inputs, tf.convert_to_tensor(kernel))


def _conv_bn(x, filters, kernel_size, stride, name_conv, name_bn, groups=1):
    """torch `Conv2d(bias=False, padding=kernel_size // 2)` + `BatchNorm2d`."""
    pad = kernel_size // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name_conv}.pad")(x)
    conv = GroupedConv2D if groups > 1 else keras.layers.Conv2D
    x = conv(
        filters,
        kernel_size,
        strides=stride,
        padding="valid",
        groups=groups,
        use_bias=False,
        name=name_conv,
    )(x)
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name_bn)(
        x
    )


def _basic_block(x, prefix, planes, stride, downsample):
    identity = x
    y = _conv_bn(x, planes, 3, stride, f"{prefix}.conv1", f"{prefix}.bn1")
    y = keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = _conv_bn(y, planes, 3, 1, f"{prefix}.conv2", f"{prefix}.bn2")
    if downsample:
        identity = _conv_bn(
            x, planes, 1, stride, f"{prefix}.downsample.0", f"{prefix}.downsample.1"
        )
    y = keras.layers.Add(name=f"{prefix}.add")([y, identity])
    return keras.layers.ReLU(name=f"{prefix}.relu")(y)


def _bottleneck_block(x, prefix, planes, stride, downsample, groups, width_per_group):
    width = int(planes * (width_per_group / 64.0)) * groups
    identity = x
    y = _conv_bn(x, width, 1, 1, f"{prefix}.conv1", f"{prefix}.bn1")
    y = keras.layers.ReLU(name=f"{prefix}.relu1")(y)
    y = _conv_bn(y, width, 3, stride, f"{prefix}.conv2", f"{prefix}.bn2", groups=groups)
    y = keras.layers.ReLU(name=f"{prefix}.relu2")(y)
    y = _conv_bn(y, planes * 4, 1, 1, f"{prefix}.conv3", f"{prefix}.bn3")
    if downsample:
        identity = _conv_bn(
            x, planes * 4, 1, stride, f"{prefix}.downsample.0", f"{prefix}.downsample.1"
        )
    y = keras.layers.Add(name=f"{prefix}.add")([y, identity])
    return keras.layers.ReLU(name=f"{prefix}.relu")(y)


def build(config: ResNetConfig, name: str = "resnet") -> keras.Model:
    """The trunk of `config` as a functional Keras model, randomly initialised."""
    images = keras.Input((None, None, 3), name="images")
    x = _conv_bn(images, config.planes[0], 7, 2, "conv1", "bn1")
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="maxpool.pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    inplanes = config.planes[0]
    for stage, (planes, num_blocks) in enumerate(zip(config.planes, config.layers, strict=True)):
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            prefix = f"layer{stage + 1}.{index}"
            downsample = index == 0 and (stride != 1 or inplanes != planes * config.expansion)
            if config.block == "basic":
                x = _basic_block(x, prefix, planes, stride, downsample)
            else:
                x = _bottleneck_block(
                    x, prefix, planes, stride, downsample, config.groups, config.width_per_group
                )
            inplanes = planes * config.expansion
    return keras.Model(images, x, name=name)


class TorchvisionResNet(family.PrefixBlocks):
    """torchvision-layout ResNets / ResNeXts: blocks "layer4.2", ..., "layer1.0", then "stem"
    (conv1/bn1); torch state dicts map by layer name. Under bfloat16 a bottleneck trunk keeps
    its stem and first block ("layer1.0.*") in float32 (`tfmet.backbones.precision`)."""

    name = "torchvision_resnet"
    pattern = re.compile(r"^(layer\d+\.\d+)\.")
    rest_layers = ("conv1.pad", "conv1", "bn1")
    converts_state_dicts = True

    def local_layer(self, model):
        """The output of layer3's last block (stride 16: DELF's conv4)."""
        return [layer.name for layer in model.layers if layer.name.startswith("layer3.")][-1]

    def float32_layers(self, model):
        if "layer1.0.conv3" not in [layer.name for layer in model.layers]:
            return []  # BasicBlock trunks meet the cosine target in bfloat16 throughout
        return family.layers_through(model, "layer1.0.")


FAMILY = registry.register_family(TorchvisionResNet())


def output_size(size: int) -> int:
    """Spatial size of the feature map for an input side of `size` pixels (torch arithmetic)."""
    for kernel, stride, pad in ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1)):
        size = math.floor((size + 2 * pad - kernel) / stride) + 1
    return size


def _builder(name: str):
    config = CONFIGS[name]

    def builder(weights=None):
        model = build(config, name=name)
        if weights is not None:
            load_weights(model, weights)
        return model

    builder.__doc__ = f"Builds {name}; `weights` is None (random) or a local .weights.h5 file."
    return builder


for _name in CONFIGS:
    registry.register(
        registry.BackboneSpec(
            name=_name,
            builder=_builder(_name),
            preprocessing=registry.IMAGENET_TORCH,
            description=_DESCRIPTIONS[_name],
            family=FAMILY,
        )
    )
