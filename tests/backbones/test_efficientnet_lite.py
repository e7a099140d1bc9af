"""EfficientNet-Lite0: architecture, the packaged ImageNet weights, and parity with PyTorch."""

import math
import os

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from tfmet import backbones
from tfmet.backbones import efficientnet_lite
from tfmet.layers import gem

torch = pytest.importorskip("torch")
F = torch.nn.functional


class SameConv(torch.nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (the port's layout)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride, 0, groups=groups, bias=False)

    def forward(self, x):
        pads = []  # F.pad order: width (left, right), then height (top, bottom)
        for axis in (1, 0):
            size, k, s = x.shape[2 + axis], self.kernel_size[axis], self.stride[axis]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


class Block(torch.nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = torch.nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = torch.nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = torch.nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.expand != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class TorchLite0(torch.nn.Module):
    """EfficientNet-Lite0 with the module names of the packaged checkpoint."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = torch.nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for stage in efficientnet_lite.LITE0_STAGES:
            for i in range(stage.repeats):
                cin = stage.filters_in if i == 0 else stage.filters_out
                stride = stage.stride if i == 0 else 1
                blocks.append(
                    Block(cin, stage.filters_out, stage.kernel_size, stride, stage.expand_ratio)
                )
        self._blocks = torch.nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1)
        self._bn1 = torch.nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = torch.nn.Linear(1280, 1000)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self._fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TFMET_CACHE_DIR")
    os.environ["TFMET_CACHE_DIR"] = str(directory)
    yield directory
    if old is None:
        os.environ.pop("TFMET_CACHE_DIR")
    else:
        os.environ["TFMET_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def classifier(cache):
    return efficientnet_lite.efficientnet_lite0(weights="imagenet", include_top=True)


@pytest.fixture(scope="module")
def torch_model():
    model = TorchLite0().eval()
    state = torch.load(efficientnet_lite.packaged_checkpoint(), weights_only=True)
    model.load_state_dict(state)
    return model


def _photo(name, size=224):
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR), np.float32)[None]


def test_registered_with_its_preprocessing():
    spec = backbones.spec("efficientnet_lite0")
    assert spec.preprocessing == efficientnet_lite.EFFICIENTNET_LITE
    x = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    np.testing.assert_allclose(spec.preprocessing(x).numpy(), [[[[-127 / 128, 0.0, 1.0]]]])
    model = backbones.get("efficientnet_lite0")
    features = model(np.zeros((1, 37, 29, 3), np.float32))
    assert tuple(features.shape) == (1, 2, 1, 1280)  # ceil(37/32), ceil(29/32): 'SAME' padding
    assert model.count_params() == 4_694_024 - 1_281_000  # the checkpoint minus the fc layer


@pytest.mark.parametrize(
    ("photo", "classes"), [("chelsea", range(281, 286)), ("coffee", (967, 968))]
)
def test_pretrained_classifier_recognises_real_photos(classifier, photo, classes):
    # chelsea is a tabby cat (ImageNet classes 281-285 are domestic cats); coffee is an espresso
    # (967) in a cup (968). Random weights would pick one of 1000 classes almost uniformly.
    images = efficientnet_lite.EFFICIENTNET_LITE(_photo(photo))
    logits = keras.ops.convert_to_numpy(classifier(images))[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert int(np.argmax(probs)) in classes
    assert probs[list(classes)].sum() > 0.5


def test_keras_matches_torch_at_odd_sizes(classifier, torch_model):
    rng = np.random.default_rng(0)
    images = np.concatenate(
        [_photo("chelsea", 64)[:, :37, :29], rng.uniform(0, 255, (1, 37, 29, 3)).astype("f4")]
    )
    normalised = efficientnet_lite.EFFICIENTNET_LITE(images).numpy()
    trunk = keras.Model(
        classifier.input, classifier.get_layer(efficientnet_lite.FEATURES_LAYER).output
    )
    keras_features = keras.ops.convert_to_numpy(trunk(normalised))
    with torch.no_grad():
        torch_input = torch.from_numpy(normalised).permute(0, 3, 1, 2)
        torch_features = torch_model.features(torch_input).permute(0, 2, 3, 1).numpy()
        torch_gem = torch_features.clip(1e-6) ** 3
        torch_logits = torch_model(torch_input).numpy()
    assert keras_features.shape == torch_features.shape == (2, 2, 1, 1280)
    feature_diff = np.abs(keras_features - torch_features).max()
    gem_keras = gem(keras_features).numpy()
    gem_torch = torch_gem.mean((1, 2)) ** (1 / 3)
    gem_diff = np.abs(gem_keras - gem_torch).max()
    logit_diff = np.abs(keras.ops.convert_to_numpy(classifier(normalised)) - torch_logits).max()
    print(f"efficientnet_lite0 37x29: features {feature_diff:.2e} gem {gem_diff:.2e}")
    assert feature_diff < 1e-4 and gem_diff < 1e-4 and logit_diff < 1e-4


def test_weights_are_converted_once_into_the_cache(classifier, cache):
    files = sorted(os.listdir(cache))
    assert [f.split("-")[0] for f in files] == [
        "efficientnet_lite0_imagenet",
        "efficientnet_lite0_imagenet_notop",
    ]
    stamps = [os.stat(os.path.join(cache, f)).st_mtime_ns for f in files]
    path = efficientnet_lite.pretrained_weights()
    assert path == os.path.join(cache, files[1])
    trunk = backbones.get("efficientnet_lite0", weights=path)
    assert trunk.output_shape == (None, None, None, 1280)
    assert [os.stat(os.path.join(cache, f)).st_mtime_ns for f in files] == stamps
    assert sorted(os.listdir(cache)) == files  # no temporary files left behind
    np.testing.assert_array_equal(
        trunk.get_layer("conv_head").kernel.numpy(),
        classifier.get_layer("conv_head").kernel.numpy(),
    )


def test_torch_path_puts_back_the_checkpoint_underscores():
    torch_path = efficientnet_lite.FAMILY.torch_path
    assert torch_path("blocks.3.bn1") == "_blocks.3._bn1"
    assert torch_path("conv_stem") == "_conv_stem"
    assert torch_path("blocks.12.depthwise_conv") == "_blocks.12._depthwise_conv"


def test_weights_saved_under_the_underscore_names_still_load(tmp_path):
    """Files converted before the layers lost their leading "_" ("_bn1", "_blocks.3._bn1")."""
    model = efficientnet_lite.build()
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])

    def old_name(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["name"] = efficientnet_lite.FAMILY.torch_path(layer.name)
        return type(layer).from_config(config)

    old = keras.models.clone_model(model, clone_function=old_name)
    old.set_weights(model.get_weights())
    assert old.get_layer("_blocks.3._bn1") is not None
    path = str(tmp_path / "old_names.weights.h5")
    old.save_weights(path)
    loaded = backbones.get("efficientnet_lite0", weights=path)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
