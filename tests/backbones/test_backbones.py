"""Backbone registry, torchvision-compatible ResNets, keras.applications, weights files."""

import contextlib
import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmet import backbones
from tfmet.backbones import keras_applications, registry, torchvision_resnet
from tfmet.backbones.weights import load_weights

try:
    import torch

    from tests.kit import torch_models
except ImportError:  # torch is a test extra; the hard-coded counts below still apply
    torch = None

TORCHVISION = list(torchvision_resnet.CONFIGS)

# Full-model parameter counts published in torchvision's model docs (num_params).
TORCHVISION_FULL = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
}
# Not in torchvision; published as 44.18M (SWSL) and 194.0M (WSL / timm model cards). The exact
# values follow from the layer shapes (also checked against tests/torch_models.py below).
OTHER_FULL = {"resnext101_32x4d": 44_177_704, "resnext101_32x16d": 194_026_792}
PUBLISHED_MILLIONS = {"resnext101_32x4d": (44.18, 2), "resnext101_32x16d": (194.0, 1)}
# resnet_tiny by hand: stem 7*7*3*8 + BN 2*8; layer1.0: 2 * (3*3*8*8 + 16); layerN.0 (c -> 2c):
# 3*3*c*2c + 3*3*2c*2c + c*2c (downsample) + 3 BNs * 2 * 2c.
TINY = (7 * 7 * 3 * 8 + 16) + 2 * (3 * 3 * 8 * 8 + 16)
TINY += sum(9 * c * 2 * c + 9 * 4 * c * c + 2 * c * c + 12 * c for c in (8, 16, 32))
FC = {"basic": 512 * 1000 + 1000, "bottleneck": 2048 * 1000 + 1000}


def expected_trunk_params(name):
    if name == "resnet_tiny":
        return TINY
    full = TORCHVISION_FULL.get(name) or OTHER_FULL[name]
    return full - FC[torchvision_resnet.CONFIGS[name].block]


@contextlib.contextmanager
def shapes_only():
    """Builds Keras models with variables that have shapes but no values (no memory, fast).

    Keras defers initialising variables created in a StatelessScope; they are dropped from
    Keras's pending list afterwards so nothing initialises them later.
    """
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    pending = list(global_state.get_global_attribute(key, [], set_to_default=True))
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute(key, pending)


def count(variables):
    return sum(math.prod(v.shape) for v in variables)


@pytest.mark.parametrize("name", TORCHVISION)
def test_trunk_parameter_count_equals_torchvision(name):
    with shapes_only():
        model = backbones.get(name)
    trainable = count(model.trainable_weights)
    assert trainable == expected_trunk_params(name)
    # BN running statistics: 2 per BN channel; each BN channel also has gamma and beta.
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert count(model.non_trainable_weights) == sum(2 * layer.gamma.shape[0] for layer in bn)
    if name in PUBLISHED_MILLIONS:
        millions, digits = PUBLISHED_MILLIONS[name]
        full = trainable + FC["bottleneck"]
        assert round(full / 1e6, digits) == millions
    if torch is None:
        return
    with torch.device("meta"):
        reference = torch_models.resnet(name)
    assert sum(p.numel() for p in torch_models.trunk(reference).parameters()) == trainable
    # Every torch trunk entry maps 1:1 onto a Keras variable of the transposed shape.
    mapped = set()
    for key, tensor in reference.state_dict().items():
        if key.startswith("fc."):
            continue
        variable = torch_models.keras_variable(model, key)
        if variable is None:
            assert key.endswith("num_batches_tracked")
            continue
        shape = tuple(tensor.shape)
        expected = shape[2:] + shape[1::-1] if len(shape) == 4 else shape
        assert tuple(variable.shape) == expected, key
        mapped.add(id(variable))
    assert len(mapped) == len(model.weights)


def test_shapes_only_build_counts_like_a_real_build():
    for name in ("resnet_tiny", "resnet18"):
        with shapes_only():
            deferred = backbones.get(name)
        real = backbones.get(name)
        assert count(deferred.weights) == real.count_params()
        assert [v.path for v in deferred.weights] == [v.path for v in real.weights]


def test_layer_names_follow_torch_module_paths():
    model = backbones.get("resnet18")
    names = [layer.name for layer in model.layers if layer.weights]
    assert names[:8] == [
        "conv1",
        "bn1",
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer1.0.conv2",
        "layer1.0.bn2",
        "layer1.1.conv1",
        "layer1.1.bn1",
    ]
    assert "layer2.0.downsample.0" in names and "layer2.0.downsample.1" in names
    assert "layer1.0.downsample.0" not in names
    bn = model.get_layer("layer3.1.bn2")
    assert (bn.epsilon, bn.momentum) == (1e-5, 0.9)
    assert model.get_layer("layer4.0.conv1").strides == (2, 2)
    assert backbones.preprocessing("resnet18") == backbones.IMAGENET_TORCH


def test_resnext_uses_v15_strides_and_grouped_convs():
    with shapes_only():
        model = backbones.get("resnext50_32x4d")
    conv1, conv2 = model.get_layer("layer2.0.conv1"), model.get_layer("layer2.0.conv2")
    assert conv1.strides == (1, 1) and conv2.strides == (2, 2)
    assert conv2.groups == 32 and tuple(conv2.kernel.shape) == (3, 3, 256 // 32, 256)
    assert model.get_layer("layer2.0.downsample.0").strides == (2, 2)


# A small bottleneck ResNeXt (grouped 3x3 convs, a downsample in every stage's first block).
SMALL_RESNEXT = torchvision_resnet.ResNetConfig(
    "bottleneck", (1, 2, 1, 1), groups=4, width_per_group=8, planes=(8, 16, 32, 64)
)


@pytest.mark.skipif(torch is None, reason="needs torch (test extra)")
@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18", "small_resnext"])
def test_feature_maps_match_torch_on_odd_sizes(name):
    torch.manual_seed(0)
    if name == "small_resnext":
        c = SMALL_RESNEXT
        reference = torch_models.ResNet(
            torch_models.Bottleneck, c.layers, c.groups, c.width_per_group, c.planes
        )
        model = torchvision_resnet.build(SMALL_RESNEXT)
    else:
        reference = torch_models.resnet(name)
        model = backbones.get(name)
    torch_models.randomize_batchnorm(reference, seed=1)
    reference.eval()
    torch_models.copy_to_keras(reference, model)
    trunk = torch_models.trunk(reference)
    for height, width in ((37, 29), (64, 45)):
        images = np.random.default_rng(height).normal(size=(2, height, width, 3))
        images = images.astype(np.float32)
        with torch.no_grad():
            expected = trunk(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = expected.numpy()
        got = keras.ops.convert_to_numpy(model(images, training=False))
        assert got.shape == expected.shape
        assert got.shape[1:3] == tuple(map(torchvision_resnet.output_size, (height, width)))
        assert np.abs(expected).max() > 0.1  # not a degenerate all-zero comparison
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_output_size_is_torch_arithmetic():
    # 37 -> conv1 19 -> maxpool 10 -> 10 -> 5 -> 3 -> 2; 224 -> 7; 1 -> 1.
    assert [torchvision_resnet.output_size(s) for s in (37, 29, 224, 1)] == [2, 1, 7, 1]
    model = backbones.get("resnet_tiny")
    assert model(np.zeros((1, 37, 29, 3), np.float32)).shape == (1, 2, 1, 64)


def test_set_trainable_blocks_selects_the_top_blocks():
    model = backbones.get("resnet18")
    family = backbones.spec("resnet18").family
    assert registry.family_of(model) is family
    assert family.blocks(model)[:3] == ["layer4.1", "layer4.0", "layer3.1"]
    assert family.blocks(model)[-1] == "stem"
    stem = [layer.name for layer in family.block_layers(model, "stem")]
    assert stem == ["conv1.pad", "conv1", "bn1"]
    assert family.set_trainable(model, trainable_blocks=2, batchnorm="train") == [
        "layer4.1",
        "layer4.0",
    ]
    owners = {v.path.split("/")[0] for v in model.trainable_weights}
    assert owners == {
        f"layer4.{i}.{part}" for i in (0, 1) for part in ("conv1", "bn1", "conv2", "bn2")
    } | {"layer4.0.downsample.0", "layer4.0.downsample.1"}
    assert not model.get_layer("layer3.1.bn2").trainable
    family.set_trainable(model, trainable_blocks=2)  # batchnorm="frozen": the convs only
    owners = {v.path.split("/")[0] for v in model.trainable_weights}
    assert owners == {f"layer4.{i}.conv{j}" for i in (0, 1) for j in (1, 2)} | {
        "layer4.0.downsample.0"
    }
    family.set_trainable(model, trainable_blocks=len(family.blocks(model)), batchnorm="train")
    assert count(model.trainable_weights) == expected_trunk_params("resnet18")
    with pytest.raises(ValueError, match=r"trainable_blocks must be in \[1, 9\]"):
        family.set_trainable(model, trainable_blocks=99)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError) as error:
        backbones.get("resnet19")
    message = str(error.value)
    assert "Unknown backbone 'resnet19'" in message
    for name in ("resnet18", "resnext101_32x16d", "keras_resnet50v2", "resnet_tiny"):
        assert name in message
    assert "hub:<handle or path>" in message


def test_weights_round_trip_and_wrong_architecture_names_the_layer(tmp_path):
    model = backbones.get("resnet_tiny")
    path = str(tmp_path / "tiny.weights.h5")
    model.save_weights(path)
    images = np.random.default_rng(0).normal(size=(1, 33, 35, 3)).astype(np.float32)
    keras.utils.set_random_seed(1)
    reloaded = backbones.get("resnet_tiny", weights=path)
    np.testing.assert_array_equal(reloaded(images), model(images))

    with pytest.raises(ValueError) as error:
        backbones.get("resnet18", weights=path)
    message = str(error.value)
    assert path in message and "'conv1'" in message
    assert "(7, 7, 3, 64)" in message and "(7, 7, 3, 8)" in message


def _functional(widths, name="net"):
    x = keras.Input((None, None, 3))
    y = x
    for i, w in enumerate(widths):
        y = keras.layers.Conv2D(w, 1, name=f"c{i}")(y)
    return keras.Model(x, y, name=name)


def test_missing_unexpected_and_bad_weights_files(tmp_path):
    path = str(tmp_path / "two.weights.h5")
    _functional([4, 5]).save_weights(path)
    with pytest.raises(ValueError, match=r"layer 'c2' \(entry layers/conv2d_2\) is missing"):
        load_weights(_functional([4, 5, 6]), path)
    with pytest.raises(
        ValueError, match=r"unexpected entry layers/conv2d_1 \(saved from layer 'c1'"
    ):
        load_weights(_functional([4]), path)
    with pytest.raises(
        ValueError, match=r"variable 'kernel' has shape \(1, 1, 4, 7\).*\(1, 1, 4, 5\)"
    ):
        load_weights(_functional([4, 7]), path)
    model = _functional([4, 5])
    assert load_weights(model, path) is model

    with pytest.raises(FileNotFoundError, match="absent.weights.h5"):
        load_weights(model, str(tmp_path / "absent.weights.h5"))
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="garbage.weights.h5 is not a readable HDF5 file"):
        load_weights(model, str(garbage))
    npz = tmp_path / "two.npz"
    np.savez(npz, kernel=np.zeros(3))
    with pytest.raises(ValueError, match="two.npz: expected a Keras '.weights.h5' file"):
        load_weights(model, str(npz))


def test_legacy_h5_weights_load_and_mismatch_names_file(tmp_path):
    model = _functional([4, 5])
    legacy = str(tmp_path / "legacy.h5")
    model.save(legacy)  # legacy HDF5: what keras.applications' downloaded weights use
    with h5py.File(legacy) as f:
        assert "model_weights" in f
    other = _functional([4, 5])
    load_weights(other, legacy)
    for a, b in zip(other.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="legacy.h5 could not be loaded"):
        load_weights(_functional([4, 6]), legacy)


KERAS_PARAMS = {  # include_top=False: Keras's documented totals minus the 2048*1000+1000 head
    "keras_resnet50": 23_587_712,
    "keras_resnet101": 42_658_176,
    "keras_resnet152": 58_370_944,
    "keras_resnet50v2": 23_564_800,
}


@pytest.mark.parametrize("name", list(KERAS_PARAMS))
def test_keras_applications_counts_preprocessing_and_blocks(name):
    with shapes_only():
        model = backbones.get(name)
    assert count(model.weights) == KERAS_PARAMS[name]
    assert tuple(model.input.shape) == (None, None, None, 3)
    assert tuple(model.output.shape) == (None, None, None, 2048)
    v2 = name.endswith("v2")
    expected = backbones.SCALE_MINUS_ONE_ONE if v2 else backbones.IMAGENET_CAFFE
    assert backbones.preprocessing(name) == expected
    family = registry.family_of(model)
    assert family is keras_applications.FAMILY is backbones.spec(name).family
    top = family.blocks(model)[0]
    assert top == "conv5_block3"
    assert family.blocks(model)[-2:] == ["conv2_block1", "stem"]
    top_layers = {layer.name for layer in family.block_layers(model, top)}
    assert ("post_bn" in top_layers) == v2
    stem = {layer.name for layer in family.block_layers(model, "stem")}
    assert stem >= {"conv1_conv", "pool1_pool"}


def test_keras_applications_weights_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = backbones.get("keras_resnet50v2")
    path = str(tmp_path / "r50v2.weights.h5")
    model.save_weights(path)
    images = np.random.default_rng(0).uniform(-1, 1, (1, 40, 52, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(images))
    assert expected.shape == (1, 2, 2, 2048)
    keras.utils.set_random_seed(1)
    reloaded = backbones.get("keras_resnet50v2", weights=path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(images)), expected)
    with shapes_only():  # the layout check fails before any value is needed
        resnet50 = backbones.get("keras_resnet50")
    with pytest.raises(ValueError, match="r50v2.weights.h5 does not match model 'resnet50'"):
        load_weights(resnet50, path)
    family = keras_applications.FAMILY
    assert family.set_trainable(reloaded, trainable_blocks=1, batchnorm="train") == ["conv5_block3"]
    names = {v.path.split("/")[0] for v in reloaded.trainable_weights}
    assert "post_bn" in names and all(n.startswith(("conv5_block3", "post_bn")) for n in names)


def test_grouped_conv_is_native_forward_with_keras_gradients(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 9, 7, 8)).astype(np.float32)
    grouped = torchvision_resnet.GroupedConv2D(8, 3, strides=2, groups=4, use_bias=False)
    plain = keras.layers.Conv2D(8, 3, strides=2, groups=4, use_bias=False)
    grouped.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(grouped.get_weights())

    def forward_and_gradients(layer, inputs):
        inputs = tf.convert_to_tensor(inputs)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(inputs)
            y = layer(inputs)
            loss = tf.reduce_sum(tf.square(y))
        return y, tape.gradient(loss, layer.kernel), tape.gradient(loss, inputs)

    # Independent numpy reference for the forward pass: each group is its own convolution.
    kernel = keras.ops.convert_to_numpy(grouped.kernel)
    expected = np.zeros((2, 4, 3, 8), np.float32)
    for g in range(4):
        for i in range(4):
            for j in range(3):
                patch = x[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, 2 * g : 2 * g + 2]
                expected[:, i, j, 2 * g : 2 * g + 2] = np.einsum(
                    "bhwc,hwco->bo", patch, kernel[..., 2 * g : 2 * g + 2]
                )
    ours, reference = forward_and_gradients(grouped, x), forward_and_gradients(plain, x)
    np.testing.assert_allclose(ours[0], expected, atol=1e-5)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The forward graph holds the native Conv2D op, not Keras's XLA-compiled call.
    graph = tf.function(grouped).get_concrete_function(tf.TensorSpec([None, None, None, 8])).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "Conv2D" in op_types and "StatefulPartitionedCall" not in op_types

    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, grouped(inputs))
    path = str(tmp_path / "grouped.keras")
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), ours[0], atol=1e-6)


class _Wrapper(keras.Model):
    """A subclassed model holding a backbone and a head (like the Embedder)."""

    def __init__(self, backbone, width, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = keras.layers.Dense(width, name="head")

    def call(self, images):
        return self.head(keras.ops.mean(self.backbone(images), axis=(1, 2)))


def _shapes(layout):
    return {entry: [shape for _, shape in variables] for entry, (_, variables) in layout.items()}


def test_expected_layout_is_what_save_weights_writes(tmp_path):
    from tfmet.backbones.weights import expected_layout, file_layout

    wrapper = _Wrapper(backbones.get("resnet_tiny"), 5)
    wrapper(np.zeros((1, 32, 32, 3), np.float32))
    models = [torchvision_resnet.build(SMALL_RESNEXT), _functional([3, 4]), wrapper]
    for index, model in enumerate(models):
        path = str(tmp_path / f"{index}.weights.h5")
        model.save_weights(path)
        assert _shapes(expected_layout(model)) == _shapes(file_layout(path))
    assert "backbone/layers/conv2d" in expected_layout(wrapper)


def test_subclassed_model_mismatch_names_layer_and_entry(tmp_path):
    small = _Wrapper(backbones.get("resnet_tiny"), 5)
    small(np.zeros((1, 32, 32, 3), np.float32))
    path = str(tmp_path / "wrapper.weights.h5")
    small.save_weights(path)
    other = _Wrapper(backbones.get("resnet_tiny"), 7)
    other(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"layer 'head' variable 'kernel' has shape \(64, 7\)"):
        load_weights(other, path)
    same = _Wrapper(backbones.get("resnet_tiny"), 5)
    same(np.zeros((1, 32, 32, 3), np.float32))
    load_weights(same, path)
    images = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(same(images), small(images))


# Built in full below; the largest sizes share their builder and naming with a smaller sibling.
_LARGEST = ("dinov2_vitg14", "dinov2_vitg14_reg", "dinov3_vit7b16", "dinov3_vith16plus")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in backbones.names() if n not in _LARGEST])
def test_every_variable_name_is_a_valid_savedmodel_name(name):
    from tfmet.export.common import VALID_VARIABLE_NAME

    model = backbones.get(name)
    if not model.built:
        model.build((None, None, None, 3))
    bad = [v.path for v in model.weights if not VALID_VARIABLE_NAME.match(v.path)]
    assert model.weights and bad == []
