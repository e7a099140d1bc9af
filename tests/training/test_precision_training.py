"""Reduced-precision training: contrastive (`precision`) and style (`model.precision`) backbones
compute in bfloat16 / float16 while GeM, L2, heads and losses stay float32; float16 trains with
dynamic loss scaling; runs recorded before the setting existed resume as float32."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.kit import tiny_backbone
from tests.kit.configs import load_config
from tests.kit.references import assert_first_adam_step_of_decay_only
from tests.kit.style_data import NUM_CLASSES
from tfmet.backbones.precision import model_precision
from tfmet.descriptors import Embedder
from tfmet.training import rundir
from tfmet.training.contrastive import loop as contrastive_loop
from tfmet.training.contrastive.config import check_config, default_config
from tfmet.training.contrastive.trainer import ContrastiveTrainer, build_embedder
from tfmet.training.style import fit as style_fit
from tfmet.training.style import run as style_run


def _contrastive_smoke(**overrides):
    return load_config("met_contrastive_r18", "smoke", **overrides)


def _pairs(count=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(2 * count, size, size, 3)).astype(np.float32)
    return images[:count], images[count:], np.array([1, 0] * (count // 2), np.int32)


def test_contrastive_config_builds_a_reduced_backbone_and_float32_pooling():
    config = check_config(
        default_config().to_dict() | {"backbone": "resnet_tiny", "emb_proj": True}
    )
    assert config["precision"] == "float32"
    embedder = build_embedder(config | {"precision": "bfloat16"})
    assert model_precision(embedder.backbone) == "bfloat16"
    assert embedder.backbone.get_layer("conv1").compute_dtype == "bfloat16"
    for layer in (embedder.pool, embedder.normalize, embedder.projector):
        assert layer.compute_dtype == "float32"
    assert model_precision(build_embedder(config)) == "float32"
    with pytest.raises(ValueError, match=r"config `precision` must be one of .*'half'"):
        check_config(config | {"precision": "half"})


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_training_step_learns(precision):
    keras.utils.set_random_seed(0)
    config = default_config().to_dict() | {"backbone": "resnet_tiny"}
    embedder = build_embedder(config | {"precision": precision})
    trainer = ContrastiveTrainer(embedder, learning_rate=1e-3, loss_scaling=precision == "float16")
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == (
        precision == "float16"
    )
    losses, distances = trainer.accumulate(*_pairs())
    assert losses.dtype == tf.float32 and distances.dtype == tf.float32  # the loss is float32
    assert all(g.dtype == tf.float32 for g in trainer._sums)  # float32 master weights/gradients
    trainer.apply()
    losses = [trainer.train_step([_pairs()]) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_loss_scaling_unscales_the_gradient_and_the_decay_term():
    # As test_weight_decay_is_added_to_the_gradient, under loss scaling: zero loss gradient, so
    # the first Adam step follows the (scaled, then unscaled) decay term alone.
    first, second, _ = _pairs(count=2)
    embedder = Embedder(tiny_backbone(seed=4))
    trainer = ContrastiveTrainer(
        embedder, learning_rate=1e-3, weight_decay=0.5, margin=1e-4, loss_scaling=True
    )
    scale = float(trainer.optimizer.dynamic_scale.numpy())
    assert scale > 1.0
    before = [v.numpy().copy() for v in embedder.trainable_variables]
    assert trainer.train_step([(first, second, np.zeros(2, np.int32))]) == 0.0
    assert_first_adam_step_of_decay_only(before, embedder.trainable_variables, 1e-3, 0.5)
    assert float(trainer.optimizer.dynamic_scale.numpy()) == scale  # finite: scale kept


def test_loss_scaling_skips_a_non_finite_step_and_halves_the_scale():
    embedder = Embedder(tiny_backbone(seed=5))
    trainer = ContrastiveTrainer(embedder, loss_scaling=True)
    scale = float(trainer.optimizer.dynamic_scale.numpy())
    before = [v.numpy().copy() for v in embedder.trainable_variables]
    trainer._sums[0].assign(tf.fill(trainer._sums[0].shape, np.inf))  # an overflowed gradient
    trainer._count.assign(1.0)
    trainer.apply()
    assert float(trainer.optimizer.dynamic_scale.numpy()) == scale / 2
    for w0, variable in zip(before, embedder.trainable_variables, strict=True):
        np.testing.assert_array_equal(variable.numpy(), w0)  # step skipped


def test_runs_recorded_without_precision_resume_as_float32():
    old = {"backbone": "resnet18"}  # a contrastive record
    new = {"backbone": "resnet18", "precision": "float32"}
    assert rundir.resume_differences(old, new, set()) == []
    assert rundir.resume_differences(old, new | {"precision": "float16"}, set()) == ["precision"]
    old = {"model": {"backbone": "r"}}  # a style record
    assert (
        rundir.resume_differences(old, {"model": {"backbone": "r", "precision": "float32"}}, set())
        == []
    )
    styled = {"model": {"backbone": "r", "precision": "bfloat16"}}
    assert rundir.resume_differences(old, styled, set()) == ["model.precision"]


def _style_model_config(precision):
    return {
        "backbone": "resnet_tiny",
        "weights": "",
        "image_size": 32,
        "pooling": "gem",
        "precision": precision,
    }


def test_style_classifier_reduced_backbone_float32_pooling_and_heads():
    names = {"style": ["a", "b", "c"]}
    classifier = style_run.build_classifier(_style_model_config("bfloat16"), names)
    assert model_precision(classifier.backbone) == "bfloat16"
    assert classifier.pool.compute_dtype == "float32"
    assert all(head.compute_dtype == "float32" for head in classifier.head.heads.values())
    images = tf.random.stateless_uniform([2, 32, 32, 3], (0, 1), 0, 255)
    assert classifier(images)["style"].dtype == tf.float32
    assert classifier.features(images).dtype == tf.float32
    with pytest.raises(ValueError, match=r"config `model.precision` must be one of .*'fp8'"):
        style_run.build_classifier(_style_model_config("fp8"), names)


def test_style_float16_compiles_with_loss_scaling_and_trains(tmp_path):
    names = {"style": [str(i) for i in range(NUM_CLASSES)]}
    classifier = style_run.build_classifier(_style_model_config("float16"), names)
    settings = style_fit.TrainSettings(epochs=1, batch_size=4, optimizer="adam")
    assert style_fit._prepare_run(classifier, settings, 1, str(tmp_path), resume=False) is None
    assert isinstance(classifier.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype(np.float32)
    labels = {"style": np.arange(8) % NUM_CLASSES}
    head = classifier.head.heads["style"].kernel.numpy().copy()
    losses = [float(classifier.train_on_batch(images, labels)[0]) for _ in range(4)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert not np.array_equal(classifier.head.heads["style"].kernel.numpy(), head)

    plain = style_run.build_classifier(_style_model_config("float32"), names)
    style_fit._prepare_run(plain, settings, 1, str(tmp_path / "f32"), resume=False)
    assert not isinstance(plain.optimizer, keras.optimizers.LossScaleOptimizer)


def test_style_train_refuses_a_bad_precision_before_writing(tmp_path):
    from configs import pandora18k

    config = pandora18k.get_config("smoke")
    config.model.precision = "float64"
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="config `model.precision` must be one of"):
        style_run.train(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.slow  # a whole (smoke) training run: ~30 s on an idle 2-core machine
def test_contrastive_float16_run_end_to_end(tmp_path):
    import glob
    import json

    from tests.kit.met_tree import write_met_tree

    tree = write_met_tree(tmp_path / "met")
    workdir = str(tmp_path / "run")
    config = _contrastive_smoke(precision="float16", epochs=1)
    result = contrastive_loop.train(config, tree.info_dir, tree.image_root, workdir)
    assert result.finished and all(np.isfinite(e["loss"]) for e in result.history)
    manifests = glob.glob(os.path.join(workdir, "descriptors", "epoch_*", "*_manifest.json"))
    assert manifests  # the stores mined from and validated on record their precision
    for path in manifests:
        with open(path) as f:
            assert json.load(f)["precision"] == "float16", path
    model = keras.saving.load_model(result.model_path)
    assert model_precision(model.backbone) == "float16"  # saved with its dtype policies
    assert model.pool.compute_dtype == "float32"
