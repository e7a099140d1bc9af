"""Compact PyTorch ResNet / ResNeXt with torchvision's module layout (torchvision not needed).

Module names and order follow `torchvision.models.resnet` (conv1, bn1, relu, maxpool,
layer1..layer4 of BasicBlock/Bottleneck with conv1/bn1/.../downsample.0/.1, avgpool, fc), so
`state_dict()` keys and shapes are those of the official checkpoints. Used by the backbone
parameter-count and numerics tests, and by parity tests and benchmarks elsewhere.

    model = tests.torch_models.resnet("resnet50")   # full classifier, 1000 classes
    trunk = tests.torch_models.trunk(model)         # children()[:-2]: ends after layer4
"""

import torch
from torch import nn

# name -> (block, layers, groups, width_per_group, planes)
ARCHS = {
    "resnet_tiny": ("basic", (1, 1, 1, 1), 1, 64, (8, 16, 32, 64)),
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64, (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64, (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64, (64, 128, 256, 512)),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64, (64, 128, 256, 512)),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64, (64, 128, 256, 512)),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4, (64, 128, 256, 512)),
    "resnext101_32x4d": ("bottleneck", (3, 4, 23, 3), 32, 4, (64, 128, 256, 512)),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8, (64, 128, 256, 512)),
    "resnext101_32x16d": ("bottleneck", (3, 4, 23, 3), 32, 16, (64, 128, 256, 512)),
}


def _conv(cin, cout, kernel, stride=1, groups=1):
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        del groups, base_width
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(inplanes, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, groups)  # v1.5: stride in the 3x3 conv
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, groups=1, width_per_group=64, planes=None, classes=1000):
        super().__init__()
        planes = planes or (64, 128, 256, 512)
        self.inplanes = planes[0]
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, planes[0], layers[0], 1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv(self.inplanes, planes * block.expansion, 1, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, self.groups, self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(name: str, classes: int = 1000) -> ResNet:
    """The full torchvision-layout classifier `name` (a key of ARCHS), randomly initialised.

    Build under `with torch.device("meta"):` to count parameters without allocating them.
    """
    block, layers, groups, width_per_group, planes = ARCHS[name]
    block = BasicBlock if block == "basic" else Bottleneck
    return ResNet(block, layers, groups, width_per_group, planes, classes)


def trunk(model: ResNet) -> nn.Sequential:
    """torchvision's feature trunk `nn.Sequential(*list(model.children())[:-2])`."""
    return nn.Sequential(*list(model.children())[:-2])


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm random affine parameters and running statistics (deterministic).

    Freshly initialised BNs are the identity in eval mode, which would hide layout mistakes.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return model


# torch BatchNorm2d entry -> Keras BatchNormalization variable.
_BN_VARIABLES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}


def keras_variable(keras_model, key: str):
    """The Keras variable that torch state_dict entry `key` maps to (None: not stored).

    The convention of tfmet.backbones.torchvision_resnet: the Keras layer is named after the
    torch module path; conv `weight` -> `kernel`, BN weight/bias/running_mean/running_var ->
    gamma/beta/moving_mean/moving_variance, `num_batches_tracked` is dropped.
    """
    import keras

    path, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    layer = keras_model.get_layer(path)
    if isinstance(layer, keras.layers.BatchNormalization):
        return getattr(layer, _BN_VARIABLES[param])
    if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
        return {"weight": layer.kernel, "bias": layer.bias}[param]
    raise ValueError(f"No Keras counterpart for torch entry {key!r} (layer {type(layer)}).")


def to_keras_layout(array):
    """torch conv OIHW -> Keras HWIO, Linear (out, in) -> (in, out); vectors unchanged."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def copy_to_keras(torch_model: nn.Module, keras_model, skip_prefixes=("fc.",)):
    """Copies a torchvision-layout model's weights into a Keras trunk built by tfmet.

    Entries under `skip_prefixes` (the classifier) are ignored. Raises ValueError when a Keras
    weight receives no value or shapes differ, so a passing copy also checks the naming.
    """
    assigned = set()
    for key, tensor in torch_model.state_dict().items():
        if key.startswith(tuple(skip_prefixes)):
            continue
        variable = keras_variable(keras_model, key)
        if variable is None:
            continue
        value = to_keras_layout(tensor.detach().cpu().numpy())
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"{key}: Keras {variable.path} {variable.shape} vs {value.shape}")
        variable.assign(value)
        assigned.add(id(variable))
    missing = [v.path for v in keras_model.weights if id(v) not in assigned]
    if missing:
        raise ValueError(f"Keras weights without a torch counterpart: {missing[:5]}")
    return keras_model
