"""Backbone families: fine-tuning, precision and conversion ask the registry, never layer names."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.kit import toy_family
from tests.kit.cli import REPO
from tfmet import backbones
from tfmet.backbones import efficientnet_lite, registry
from tfmet.backbones.precision import set_precision
from tfmet.training.style import finetune as style_finetune
from tfmet.training.style.model import StyleClassifier


def _trainable_layers(model):
    return sorted({v.path.split("/")[0] for v in model.trainable_weights})


def test_a_family_registered_outside_tfmet_drives_finetuning_and_precision():
    classifier = StyleClassifier.from_registry("toy_net", {"style": ["a", "b"]})
    classifier.build((None, 8, 8, 3))
    backbone = classifier.backbone
    assert registry.family_of(backbone) is toy_family.FAMILY
    assert style_finetune.set_trainable(classifier, trainable_blocks=2) == ["top", "bottom"]
    assert _trainable_layers(backbone) == ["bottom_conv", "top_conv"]
    with pytest.raises(ValueError, match=r"trainable_blocks must be in \[1, 3\] .*'toy_net'"):
        style_finetune.set_trainable(classifier, trainable_blocks=4)
    set_precision(backbone, "bfloat16")
    dtypes = {layer.name: layer.compute_dtype for layer in backbone.layers[1:]}
    assert dtypes == {"stem_conv": "float32", "bottom_conv": "bfloat16", "top_conv": "bfloat16"}


@pytest.mark.slow
def test_convert_weights_runs_the_family_converter(tmp_path):
    rng = np.random.default_rng(0)
    kernels = {name: rng.normal(size=(3, 3, 3 if name == "stem_conv" else 4, 4))
               for name in toy_family.LAYERS}  # fmt: skip
    np.savez(tmp_path / "toy.npz", **kernels)
    out = tmp_path / "toy.weights.h5"
    script = (
        "import sys; import tests.kit.toy_family; from tfmet.cli import convert_weights; "
        "sys.argv = sys.argv[1:]; convert_weights.run()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "tfmet-convert-weights", f"--from={tmp_path / 'toy.npz'}",
         "--arch=toy_net", f"--out={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Converted {tmp_path / 'toy.npz'} -> {out} (backbone of toy_net)"
    model = backbones.get("toy_net", weights=str(out))
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(model.get_layer(name).kernel.numpy(), kernel.astype("f4"))


def test_a_family_without_a_converter_says_so():
    with pytest.raises(ValueError, match=r"'keras_resnet50' \(keras_resnet family\) has no"):
        backbones.spec("keras_resnet50").family.convert("x.h5", "keras_resnet50", "y.weights.h5")


def test_efficientnet_lite_blocks_and_their_layers():
    model = backbones.get("efficientnet_lite0")
    family = backbones.spec("efficientnet_lite0").family
    assert registry.family_of(model) is family is efficientnet_lite.FAMILY
    blocks = family.blocks(model)
    assert blocks == [f"blocks.{i}" for i in range(15, -1, -1)] + ["stem"]
    top = [layer.name for layer in family.block_layers(model, "blocks.15")]
    assert top[-3:] == ["conv_head", "bn1", "head_act"]
    assert [layer.name for layer in family.block_layers(model, "stem")] == [
        "conv_stem",
        "bn0",
        "stem_act",
    ]
    # Every layer with weights is in exactly one block.
    owners = [layer.name for block in blocks for layer in family.block_layers(model, block)]
    weighted = {layer.name for layer in model.layers if layer.weights}
    assert weighted <= set(owners) and len(owners) == len(set(owners))


def test_efficientnet_lite_fine_tunes_its_top_blocks():
    """`--trainable_blocks N` on EfficientNet-Lite0: was refused ("no block structure known")."""
    keras.utils.set_random_seed(0)
    classifier = StyleClassifier.from_registry("efficientnet_lite0", {"style": ["a", "b"]})
    classifier.build((None, 32, 32, 3))
    names = style_finetune.set_trainable(classifier, trainable_blocks=2)
    assert names == ["blocks.15", "blocks.14"]
    expected = ["blocks.14.depthwise_conv", "blocks.14.expand_conv", "blocks.14.project_conv"]
    expected += [name.replace("14", "15") for name in expected] + ["conv_head"]
    assert _trainable_layers(classifier.backbone) == sorted(expected)
    style_finetune.set_trainable(classifier, trainable_blocks=1, batchnorm="train")
    assert _trainable_layers(classifier.backbone) == sorted(
        [name for name in expected if "15" in name or name == "conv_head"]
        + ["blocks.15.bn0", "blocks.15.bn1", "blocks.15.bn2", "bn1"]
    )
