"""tfmet.training.style.finetune: which backbone variables train (blocks, fraction, hub)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.kit.hub_modules import SlimHubTrunk as _HubTrunk
from tests.kit.style_data import NUM_CLASSES
from tfmet.backbones import hub, registry
from tfmet.data import style_images
from tfmet.training.style import finetune as style_finetune
from tfmet.training.style import fit as style_train
from tfmet.training.style import run as style_run
from tfmet.training.style.model import StyleClassifier, StyleHead


def _finetune(batchnorm, dataset):
    keras.utils.set_random_seed(0)
    classifier = StyleClassifier.from_registry(
        "resnet_tiny", {"style": [f"c{i}" for i in range(NUM_CLASSES)]}, name="style_classifier"
    )
    classifier.build((None, 32, 32, 3))
    unfrozen = style_finetune.set_trainable(classifier, trainable_blocks=1, batchnorm=batchnorm)
    before = {v.path: v.numpy().copy() for v in classifier.weights}
    records = style_run.load_records(
        {"format": "pandora18k", "root": dataset, "attributes": ["style"]}
    )
    indices = np.arange(0, len(records), 4)[:24]
    data = style_images.image_dataset(
        records.abspaths(indices), {"style": records.labels["style"][indices]}, 32, 8
    )
    style_train.compile_for_attributes(classifier, ["style"], keras.optimizers.SGD(0.05))
    classifier.fit(data, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    moved = {v.path for v in classifier.weights if not np.array_equal(v.numpy(), before[v.path])}
    return unfrozen, moved, set(before)


def test_finetuning_top_block_moves_exactly_its_variables(dataset):
    unfrozen, moved, everything = _finetune("frozen", dataset)
    assert unfrozen == ["layer4.0"]
    head = {"style_classifier/head/style_logits/kernel", "style_classifier/head/style_logits/bias"}
    convs = {"layer4.0.conv1/kernel", "layer4.0.conv2/kernel", "layer4.0.downsample.0/kernel"}
    assert moved == convs | head
    # BatchNorm of the top block, every lower block and the stem stayed bit-identical.
    assert "layer4.0.bn1/gamma" in everything - moved
    assert "layer4.0.bn1/moving_mean" in everything - moved
    assert "layer3.0.conv1/kernel" in everything - moved and "conv1/kernel" in everything - moved

    _, moved_bn, _ = _finetune("train", dataset)
    bn = {
        f"layer4.0.{name}/{var}"
        for name in ("bn1", "bn2", "downsample.1")
        for var in ("gamma", "beta", "moving_mean", "moving_variance")
    }
    assert moved_bn == convs | head | bn


def test_trainable_fraction_and_option_errors():
    classifier = StyleClassifier.from_registry("resnet_tiny", {"style": ["a", "b"]})
    classifier.build((None, 32, 32, 3))
    weighted = [layer for layer in classifier.backbone.layers if layer.weights]
    names = style_finetune.set_trainable(classifier, trainable_fraction=0.25, batchnorm="train")
    count = int(np.ceil(0.25 * len(weighted)))
    assert names == [layer.name for layer in weighted[-count:]]
    trainable = {v.path for v in classifier.backbone.trainable_variables}
    assert trainable == {v.path for layer in weighted[-count:] for v in layer.trainable_weights}
    with pytest.raises(ValueError, match="Choose one of"):
        style_finetune.set_trainable(classifier, trainable_blocks=1, trainable_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        style_finetune.set_trainable(classifier, trainable_blocks=6)
    with pytest.raises(ValueError, match="hub modules"):
        style_finetune.set_trainable(classifier, trainable_patterns=["layer4"])
    with pytest.raises(ValueError, match="batchnorm"):
        style_finetune.set_trainable(classifier, batchnorm="affine")
    assert style_finetune.set_trainable(classifier) == []
    assert {v.path for v in classifier.trainable_variables} == {
        v.path for v in classifier.head.trainable_variables
    }


def test_block_prefixed_keras_names():
    x = keras.Input((None, None, 3))
    y = keras.layers.Conv2D(4, 3, name="stem_conv")(x)
    y = keras.layers.Conv2D(4, 3, name="block1a_conv")(y)
    y = keras.layers.BatchNormalization(name="block1a_bn")(y)
    y = keras.layers.Conv2D(4, 3, name="block2a_conv")(y)
    y = keras.layers.BatchNormalization(name="block2a_bn")(y)
    backbone = keras.Model(x, y)
    classifier = StyleClassifier(backbone, StyleHead({"style": ["a", "b"]}), backbone_name="toy")
    classifier.build((None, 16, 16, 3))
    assert registry.family_of(backbone).blocks(backbone) == ["block2a", "block1a", "rest"]
    assert style_finetune.set_trainable(classifier, trainable_blocks=1) == ["block2a"]
    assert [v.path for v in backbone.trainable_variables] == [
        "block2a_conv/kernel",
        "block2a_conv/bias",
    ]


def test_hub_module_blocks_and_patterns(tmp_path):
    directory = str(tmp_path / "hub_module")
    tf.saved_model.save(_HubTrunk(), directory)
    classifier = StyleClassifier.from_registry(f"hub:{directory}", {"style": ["a", "b", "c"]})
    classifier.build((None, 8, 8, 3))
    family = registry.family_of(classifier.backbone)
    assert family is hub.FAMILY
    assert family.blocks(classifier.backbone) == ["block2/unit_1", "block1/unit_1"]
    names = style_finetune.set_trainable(classifier, trainable_blocks=1)
    assert names == ["net/block2/unit_1/conv/weights:0"]  # BatchNorm gamma stays frozen
    names = style_finetune.set_trainable(classifier, trainable_blocks=1, batchnorm="train")
    assert sorted(names) == [
        "net/block2/unit_1/BatchNorm/gamma:0",
        "net/block2/unit_1/conv/weights:0",
    ]
    names = style_finetune.set_trainable(classifier, trainable_patterns=["block1/"])
    assert names == ["net/block1/unit_1/conv/weights:0"]
    assert len(classifier.trainable_variables) == 1 + 2  # one hub variable + head kernel, bias
    assert style_finetune.set_trainable(classifier) == []
    assert len(classifier.trainable_variables) == 2
