"""PyTorch state dicts -> Keras backbones and the Met `Embedder` (GeM p, projector).

The Keras backbones name every weight-holding layer after its torch module path (torchvision
ResNets: "conv1", "layer1.0.downsample.0"), or give the path with their family's
`torch_path` (`tfmet.backbones.family`; EfficientNet-Lite: layer "blocks.3.bn1" is
"_blocks.3._bn1", as a SavedModel refuses names that start with "_"), so the mapping is
generic, by layer type:

    Conv2D              <path>.weight [O, I/groups, kh, kw] -> kernel [kh, kw, I/groups, O]
                        <path>.bias                         -> bias
    DepthwiseConv2D     <path>.weight [C*m, 1, kh, kw]      -> depthwise_kernel [kh, kw, C, m]
    BatchNormalization  <path>.weight / .bias / .running_mean / .running_var
                                                            -> gamma / beta / moving_mean /
                                                               moving_variance
    Dense               <path>.weight [out, in]             -> kernel [in, out]; .bias -> bias
    GeMPooling2D        pool.p [1]                          -> power (scalar)

`<path>.num_batches_tracked` is dropped. Checkpoint layouts are first brought to these names
(`canonical_names`):

- `module.` prefixes (DataParallel) are stripped when loading (`tfmet.io.torch_checkpoint`);
- the Met reference's `siamese_network` (`backbone.backbone.<i>...`, `backbone.pool.p`,
  `backbone.projector.*`) and `Embedder` (`backbone.<i>...`, `pool.p`, `projector.*`), whose
  trunk is `nn.Sequential(*resnet.children()[:-2])`, and the extraction script's
  `nn.Sequential(*children()[:-2], GeM(), L2N())` (`<i>...`, `8.p`): child index i becomes the
  torchvision name (0 conv1, 1 bn1, 4-7 layer1-layer4);
- everything else (torchvision, SWSL/WSL, SwAV, SIN, EfficientNet-Lite) is already canonical.

Every Keras weight must be found, with the right shape, and every checkpoint tensor must be used,
except known heads that a trunk does not have (`DEFAULT_IGNORE`: torchvision/EfficientNet
classifiers "fc."/"_fc.", SwAV "projection_head."/"prototypes."); anything else fails with a
ValueError listing the names.

Converted files are Keras `.weights.h5` files (`save_weights`) with HDF5 root attributes
describing them (`read_metadata`): kind "backbone" (loadable with
`tfmet.backbones.get(arch, weights=path)`) or kind "embedder" (backbone + GeM p [+ projector];
written and rebuilt by `tfmet.descriptors.conversion`, one layer up).
"""

import collections
import dataclasses
import os
import re

import h5py
import keras
import numpy as np

from tfmet.io.atomic import atomic_path
from tfmet.io.torch_checkpoint import load_state_dict
from tfmet.layers import GeMPooling2D

FORMAT = "tfmet-converted-weights"
DEFAULT_IGNORE = ("fc.", "_fc.", "projection_head.", "prototypes.")
# torchvision ResNet children order: nn.Sequential(*resnet.children()) index -> module name.
TORCHVISION_RESNET_CHILDREN = (
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
    "fc",
)
POOL = "pool"
PROJECTOR = "projector"


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
      assigned: checkpoint tensor names that were written into Keras weights.
      ignored: checkpoint tensor names deliberately left out (heads, BN counters).
      layers: number of Keras layers that received weights.
    """

    assigned: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)
    layers: int = 0

    def summary(self):
        text = f"{len(self.assigned)} tensors into {self.layers} Keras layers"
        counters = [n for n in self.ignored if n.endswith(".num_batches_tracked")]
        heads = [n for n in self.ignored if not n.endswith(".num_batches_tracked")]
        if heads:
            shown = ", ".join(heads[:6]) + (" ..." if len(heads) > 6 else "")
            text += f"; left out {len(heads)} head tensors ({shown})"
        if counters:
            text += f"; dropped {len(counters)} BatchNorm counters"
        return text


def _is_child_path(name):
    """Whether `name` starts with a child index, as in an `nn.Sequential` ("4.0.conv1.weight")."""
    return re.match(r"^\d+\.", name) is not None


def _child_name(name):
    """ "4.0.conv1.weight" -> "layer1.0.conv1.weight" (torchvision ResNet children order)."""
    index, rest = name.split(".", 1)
    if int(index) >= len(TORCHVISION_RESNET_CHILDREN):
        raise ValueError(f"checkpoint tensor {name!r}: no torchvision ResNet child number {index}")
    return f"{TORCHVISION_RESNET_CHILDREN[int(index)]}.{rest}"


def canonical_names(state_dict):
    """Renames the Met reference layouts to torchvision-style names (see the module docstring).

    Returns:
      OrderedDict with backbone tensors under their torchvision/Keras names and the Embedder's
      extras under "pool.p" and "projector.weight" / "projector.bias".
    """
    names = list(state_dict)
    if names and all(n.startswith("backbone.") for n in names):
        if any(n.startswith("backbone.backbone.") for n in names):  # siamese_network(Embedder)
            state_dict = collections.OrderedDict(
                (n[len("backbone.") :], v) for n, v in state_dict.items()
            )
    trunk = [n[len("backbone.") :] for n in state_dict if n.startswith("backbone.")]
    embedder = bool(trunk) and all(_is_child_path(n) for n in trunk)
    sequential = not embedder and all(_is_child_path(n) for n in state_dict)
    out = collections.OrderedDict()
    for name, value in state_dict.items():
        if embedder and name.startswith("backbone."):  # Embedder: backbone = Sequential(trunk)
            name = _child_name(name[len("backbone.") :])
        elif sequential:  # Sequential(*trunk, GeM(), L2N()): the GeM is child 8
            index, rest = name.split(".", 1)
            is_pool = rest == "p" and int(index) == TORCHVISION_RESNET_CHILDREN.index("avgpool")
            name = f"{POOL}.p" if is_pool else _child_name(name)
        out[name] = value
    return out


def weight_layers(model, torch_path=None):
    """(torch path, layer) for each layer that owns weights, descending into nested models.

    `torch_path(layer name)` gives the torch module path (`Family.torch_path`); None: the
    layer's name is its path.
    """
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(weight_layers(layer, torch_path))
        elif layer.weights:
            found.append((torch_path(layer.name) if torch_path else layer.name, layer))
    return found


def _expected(layer, path):
    """[(torch name, keras variable, transform)] for one Keras layer."""
    transpose = lambda axes: lambda w: np.transpose(w, axes)
    identity = lambda w: w
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        multiplier = layer.depth_multiplier

        def depthwise(w):
            kh, kw = w.shape[2:]
            return np.transpose(w.reshape(-1, multiplier, kh, kw), (2, 3, 0, 1))

        pairs = [(f"{path}.weight", layer.kernel, depthwise)]
        if layer.use_bias:
            pairs.append((f"{path}.bias", layer.bias, identity))
        return pairs
    if isinstance(layer, keras.layers.Conv2D):
        pairs = [(f"{path}.weight", layer.kernel, transpose((2, 3, 1, 0)))]
        if layer.use_bias:
            pairs.append((f"{path}.bias", layer.bias, identity))
        return pairs
    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = []
        if layer.scale:
            pairs.append((f"{path}.weight", layer.gamma, identity))
        if layer.center:
            pairs.append((f"{path}.bias", layer.beta, identity))
        pairs.append((f"{path}.running_mean", layer.moving_mean, identity))
        pairs.append((f"{path}.running_var", layer.moving_variance, identity))
        return pairs
    if isinstance(layer, keras.layers.Dense):
        pairs = [(f"{path}.weight", layer.kernel, transpose((1, 0)))]
        if layer.use_bias:
            pairs.append((f"{path}.bias", layer.bias, lambda b: b.reshape(-1)))
        return pairs
    if isinstance(layer, GeMPooling2D):
        return [(f"{path}.p", layer.power, lambda p: np.asarray(p).reshape(()))]
    raise ValueError(
        f"layer {layer.name!r} ({type(layer).__name__}) holds weights but has no torch mapping"
    )


def _is_ignored(name, ignore):
    return name.endswith(".num_batches_tracked") or any(name.startswith(p) for p in ignore)


def assign(targets, state_dict, source="<state dict>", ignore=DEFAULT_IGNORE):
    """Writes `state_dict` tensors into Keras layers.

    Args:
      targets: [(torch module path, built Keras layer)].
      state_dict: canonical name -> numpy array.
      source: the checkpoint's name, for messages.
      ignore: name prefixes that may stay unused (`.num_batches_tracked` always may).

    Returns:
      ConversionReport.

    Raises:
      ValueError: a Keras weight has no tensor, a shape differs, or a tensor is left unused;
        the message names the checkpoint and lists the names.
    """
    report = ConversionReport()
    missing, shape_errors, values = [], [], []
    for path, layer in targets:
        for name, variable, transform in _expected(layer, path):
            if name not in state_dict:
                missing.append(f"{name} (for {layer.name}/{variable.name})")
                continue
            tensor = np.asarray(state_dict[name])
            try:
                value = transform(tensor)
            except ValueError:
                value = None
            if value is None or tuple(value.shape) != tuple(variable.shape):
                shape_errors.append(
                    f"{name}: torch shape {tuple(tensor.shape)} does not fit "
                    f"{layer.name}/{variable.name} of shape {tuple(variable.shape)}"
                )
                continue
            values.append((variable, value))
            report.assigned.append(name)
        report.layers += 1
    used = set(report.assigned)
    unused = [n for n in state_dict if n not in used and not _is_ignored(n, ignore)]
    report.ignored = [n for n in state_dict if n not in used and _is_ignored(n, ignore)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} Keras weights have no tensor: " + _listing(missing))
    if shape_errors:
        problems.append(f"{len(shape_errors)} shapes differ: " + _listing(shape_errors))
    if unused:
        problems.append(f"{len(unused)} checkpoint tensors are not mapped: " + _listing(unused))
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
    return report


def _listing(items, limit=8):
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_torch_weights(model, checkpoint, key=None, ignore=DEFAULT_IGNORE, torch_path=None):
    """Loads a torch checkpoint into a Keras model whose layers carry the torch module names
    (or names that `torch_path` turns into them, see `weight_layers`).

    Returns:
      ConversionReport.
    """
    state_dict = canonical_names(load_state_dict(checkpoint, key=key))
    if not model.built:
        model.build((None, None, None, 3))
    targets = weight_layers(model, torch_path)
    return assign(targets, state_dict, source=os.fspath(checkpoint), ignore=ignore)


def save_weights(model, path, **metadata):
    """`model.save_weights(path)` atomically, with `metadata` as HDF5 root attributes."""
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"`path` must end with '.weights.h5'. Received: path={path!r}")
    with atomic_path(path) as tmp:
        model.save_weights(tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs["format"] = FORMAT
            for key, value in metadata.items():
                f.attrs[key] = value
    return path


def read_metadata(path):
    """The root attributes of a converted `.weights.h5` ({} for plain Keras weight files)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 weights file ({e})") from None
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out if out.get("format") == FORMAT else {}
