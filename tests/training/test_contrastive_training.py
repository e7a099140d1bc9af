"""Contrastive training: augmentation, pair pipeline, optimizer, trainer, the resumable loop.

The loop runs on the tiny Met tree of tests/kit/met_tree.py with the smoke config (resnet_tiny,
32 px crops, 4 pairs a batch, 2 batches a step, 2 epochs of 16 pairs = 4 steps).
"""

import glob
import json
import os
import pickle
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.kit import tiny_backbone
from tests.kit.configs import load_config
from tests.kit.met_tree import write_met_tree
from tests.kit.references import assert_first_adam_step_of_decay_only
from tfmet.data import descriptor_store as store_lib
from tfmet.data import pairs as pairs_lib
from tfmet.data.images import read_image
from tfmet.descriptors import DescriptorExtractor, Embedder
from tfmet.training.contrastive import loop as contrastive_loop
from tfmet.training.contrastive.augment import (
    Augmenter,
    central_crop_box,
    random_resized_crop_box,
)
from tfmet.training.contrastive.config import AugmentConfig
from tfmet.training.contrastive.data import init_projector_from_pca, read_initial_descriptors
from tfmet.training.contrastive.mining import Pairs
from tfmet.training.contrastive.optimizer import TorchAdam, step_decay
from tfmet.training.contrastive.trainer import ContrastiveTrainer


def smoke_config(**overrides):
    return load_config("met_contrastive_r18", "smoke", **overrides)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"))


@pytest.fixture(scope="module")
def augmenter():
    return Augmenter(AugmentConfig(image_size=32))


# -- augmentation ------------------------------------------------------------------------------


def test_crop_box_follows_torchvision_rules():
    # An elongated image: no square crop of >= 70% of its area fits, so the central fallback.
    assert [int(v) for v in random_resized_crop_box(100, 20, [1, 2])] == [40, 0, 20, 20]
    assert [int(v) for v in central_crop_box(48, 64)] == [0, 8, 48, 48]  # ratio clamped
    assert [int(v) for v in central_crop_box(40, 40)] == [0, 0, 40, 40]
    for seed in range(40):
        top, left, h, w = (int(v) for v in random_resized_crop_box(300, 400, [seed, 7]))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.7 * 120000 * 0.99 <= h * w <= 120000 * 1.01
        assert 0.98 <= w / h <= 1.02


def test_augmentation_is_deterministic_and_the_same_in_tf_data(augmenter):
    image = tf.random.stateless_uniform([48, 64, 3], [0, 1], 0, 255)
    seed = tf.constant([3, 9], tf.int64)
    eager = augmenter(image, seed).numpy()
    assert eager.shape == (32, 32, 3) and eager.min() >= 0 and eager.max() <= 255
    np.testing.assert_array_equal(augmenter(image, seed).numpy(), eager)
    mapped = tf.data.Dataset.from_tensors((image, seed)).map(augmenter)
    np.testing.assert_allclose(next(iter(mapped)).numpy(), eager, atol=1e-4)
    other = augmenter(image, tf.constant([3, 10], tf.int64)).numpy()
    assert np.abs(other - eager).max() > 1.0


def test_jitter_and_grayscale_properties():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.uniform(40, 200, (32, 32, 3)), tf.float32)
    full = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=1.0, grayscale_prob=0.0)
    # Brightness only: every pixel scaled by the same factor in [0.6, 1.4].
    bright = Augmenter(AugmentConfig(image_size=32, contrast=0, saturation=0, hue=0, **full))
    for seed in range(3):
        out = bright(image, [seed, 0]).numpy()
        ratio = out / image.numpy()
        inside = out < 254.9
        assert np.ptp(ratio[inside]) < 1e-4 and 0.6 <= ratio[inside].mean() <= 1.4
    # Saturation only: a blend with the grayscale image keeps the luma where nothing clips.
    saturation = Augmenter(AugmentConfig(image_size=32, brightness=0, contrast=0, hue=0, **full))
    luma = tf.image.rgb_to_grayscale(image).numpy()
    out = saturation(image, [1, 0])
    np.testing.assert_allclose(tf.image.rgb_to_grayscale(out).numpy(), luma, atol=0.05)
    # Grayscale with probability 1: three equal channels.
    gray = Augmenter(
        AugmentConfig(image_size=32, **(full | {"jitter_prob": 0.0, "grayscale_prob": 1.0}))
    )
    out = gray(image, [2, 0]).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-4)
    np.testing.assert_allclose(out[..., 0], luma[..., 0], atol=1e-3)
    # No augmentation: the central square crop resized (here the whole image, identity).
    plain = Augmenter(AugmentConfig(image_size=32), augment=False)
    np.testing.assert_allclose(plain(image, [0, 0]).numpy(), image.numpy(), atol=1e-3)


# -- pair pipeline -----------------------------------------------------------------------------


def test_pair_dataset_order_and_resume_offset(tree, augmenter):
    files = [tree.image_path(e["path"]) for e in tree.train]
    pairs = Pairs(
        first=np.array([0, 1, 2, 3, 4, 5, 6]),
        second=np.array([0, 0, 5, 3, 1, 5, 7]),
        label=np.array([1, 1, 0, 1, 0, 1, 0], np.int32),
        kind=np.array([0, 1, 2, 0, 2, 1, 2], np.int8),
    )
    full = list(pairs_lib.pair_dataset(files, pairs, augmenter, 3, seed=5, epoch=2))
    assert [b["label"].numpy().tolist() for b in full] == [[1, 1, 0], [1, 0, 1], [0]]
    assert full[0]["first"].shape == (3, 32, 32, 3)
    # A synthetic pair is one image under two different augmentations.
    assert np.abs(full[0]["first"][0] - full[0]["second"][0]).max() > 1.0
    resumed = list(pairs_lib.pair_dataset(files, pairs, augmenter, 3, seed=5, epoch=2, start=3))
    assert len(resumed) == 2
    for a, b in zip(full[1:], resumed, strict=True):
        np.testing.assert_array_equal(a["position"].numpy(), b["position"].numpy())
        np.testing.assert_allclose(a["first"].numpy(), b["first"].numpy(), atol=1e-4)
        np.testing.assert_allclose(a["second"].numpy(), b["second"].numpy(), atol=1e-4)
    other_epoch = next(iter(pairs_lib.pair_dataset(files, pairs, augmenter, 3, seed=5, epoch=3)))
    assert np.abs(other_epoch["first"] - full[0]["first"]).max() > 1.0


def test_an_image_that_went_bad_after_extraction_is_named(tree, augmenter, tmp_path):
    """A file readable at extraction but broken when its epoch reads it: one ValueError naming
    the file and the pairs of the failing batch, instead of tf.data's op error naming nothing."""
    files = []
    for i, entry in enumerate(tree.train[:8]):
        files.append(tmp_path / f"{i}.jpg")
        shutil.copyfile(tree.image_path(entry["path"]), files[-1])
    files[7].write_bytes(b"no longer a JPEG")
    pairs = Pairs(
        first=np.array([0, 1, 2, 3, 4, 5, 6]),
        second=np.array([0, 0, 5, 3, 1, 5, 7]),
        label=np.array([1, 1, 0, 1, 0, 1, 0], np.int32),
        kind=np.array([0, 1, 2, 0, 2, 1, 2], np.int8),
    )
    for start in (0, 3):  # a fresh epoch and a resumed one count pairs from where they start
        dataset = pairs_lib.pair_dataset(files, pairs, augmenter, 3, seed=5, epoch=2, start=start)
        batches = contrastive_loop._NamedFailures(iter(dataset), files, pairs, 3, epoch=2)
        batches.position = start
        readable = [next(batches)["position"].numpy().tolist() for _ in range(start, 6, 3)]
        assert readable == [[0, 1, 2], [3, 4, 5]][start // 3 :]
        with pytest.raises(ValueError) as failure:
            next(batches)
        message = str(failure.value)
        assert message.startswith(f"{files[7]}: cannot be read for training (epoch 2, pairs 6-6)")
        assert "--resume" in message

    class Failing:  # an op error of no image: raised as it is
        def __next__(self):
            raise tf.errors.UnknownError(None, None, "something else")

    batches = contrastive_loop._NamedFailures(Failing(), files[:7], pairs, 3, epoch=1)
    with pytest.raises(tf.errors.UnknownError, match="something else"):
        next(batches)


# -- optimizer and trainer ---------------------------------------------------------------------


def test_torch_adam_matches_pytorch_with_coupled_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=7).astype(np.float32)
    grads = [
        (rng.normal(size=7) * 10.0 ** rng.uniform(-9, -6)).astype(np.float32) for _ in range(6)
    ]
    param = torch.nn.Parameter(torch.tensor(w0))
    reference = torch.optim.Adam([param], lr=1e-3, weight_decay=1e-6)
    for g in grads:
        param.grad = torch.tensor(g)
        reference.step()

    def run(optimizer):
        variable = keras.Variable(w0)
        optimizer.build([variable])
        for g in grads:
            optimizer.apply([tf.constant(g) + 1e-6 * variable.value], [variable])
        return variable.numpy()

    expected = param.detach().numpy()
    np.testing.assert_allclose(run(TorchAdam(1e-3)), expected, rtol=0, atol=3e-7)
    # Keras's Adam adds epsilon before the bias correction: visibly off for such gradients.
    keras_adam = run(keras.optimizers.Adam(1e-3, epsilon=1e-8))
    assert np.abs(keras_adam - expected).max() > 1e-5


def test_step_decay():
    assert [step_decay(1e-7, e, 6, 0.1) for e in (1, 6, 7, 12, 13)] == pytest.approx(
        [1e-7, 1e-7, 1e-8, 1e-8, 1e-9]
    )


def _batch(tree, count=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for entry in tree.train[: 2 * count]:
        image = tf.io.decode_jpeg(tf.io.read_file(tree.image_path(entry["path"])))
        images.append(tf.image.resize(tf.cast(image, tf.float32), [size, size]).numpy())
    images = np.stack(images)
    labels = (rng.uniform(size=count) < 0.5).astype(np.int32)
    return images[:count], images[count:], labels


def test_fixed_batch_loss_decreases_and_batchnorm_stays_frozen(tree):
    keras.utils.set_random_seed(0)
    embedder = Embedder.from_registry("resnet_tiny")
    trainer = ContrastiveTrainer(embedder, learning_rate=1e-3, weight_decay=1e-6)
    bn = embedder.backbone.get_layer("bn1")
    moving = bn.moving_mean.numpy().copy()
    gamma = bn.gamma.numpy().copy()
    first, second, labels = _batch(tree)
    losses = [trainer.train_step([(first, second, labels)]) for _ in range(6)]
    print("fixed-batch losses:", [round(v, 4) for v in losses])
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.6 * losses[0]
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving)  # statistics frozen
    assert np.abs(bn.gamma.numpy() - gamma).max() > 1e-4  # affine parameters trained
    assert float(embedder.pool.power.numpy()) != 3.0  # GeM p trained


def test_gradient_accumulation_equals_one_big_batch(tree):
    first, second, labels = _batch(tree, count=4)
    labels = np.array([1, 0, 1, 0], np.int32)

    def trained(sub_batches):
        embedder = Embedder(tiny_backbone(seed=3), train_p=False)
        trainer = ContrastiveTrainer(embedder, learning_rate=1e-2, weight_decay=0.1)
        loss = trainer.train_step(sub_batches)
        return loss, [v.numpy() for v in embedder.trainable_variables], embedder

    loss_one, weights_one, embedder = trained([(first, second, labels)])
    loss_two, weights_two, _ = trained(
        [(first[:2], second[:2], labels[:2]), (first[2:], second[2:], labels[2:])]
    )
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for a, b in zip(weights_one, weights_two, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(embedder.pool.power.numpy()) == 3.0  # train_p=False keeps p


def test_weight_decay_is_added_to_the_gradient(tree):
    # With a tiny margin the negatives are all beyond it: zero loss gradient, so the first
    # step follows the decay term alone: w - lr * g / (|g| + eps) with g = wd * w.
    first, second, _ = _batch(tree, count=2)
    embedder = Embedder(tiny_backbone(seed=4))
    trainer = ContrastiveTrainer(embedder, learning_rate=1e-3, weight_decay=0.5, margin=1e-4)
    before = [v.numpy().copy() for v in embedder.trainable_variables]
    assert trainer.train_step([(first, second, np.zeros(2, np.int32))]) == 0.0
    assert_first_adam_step_of_decay_only(before, embedder.trainable_variables, 1e-3, 0.5)


# -- initial descriptors and the projector -----------------------------------------------------


def test_read_initial_descriptors(tmp_path):
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(5, 4)).astype(np.float32)
    store_lib.write_store(tmp_path / "store", "train", descriptors, valid=[1, 1, 0, 1, 1])
    got, valid = read_initial_descriptors(tmp_path / "store", 5, 4)
    np.testing.assert_array_equal(got, descriptors)
    assert valid.tolist() == [True, True, False, True, True]
    os.makedirs(tmp_path / "ref")
    with open(tmp_path / "ref" / "descriptors.pkl", "wb") as f:
        pickle.dump({"train_descriptors": descriptors.astype(np.float64)}, f)
    got, valid = read_initial_descriptors(tmp_path / "ref", 5, 4)
    np.testing.assert_allclose(got, descriptors) and valid.all()
    with pytest.raises(ValueError, match=r"shape \(5, 4\).*6 images"):
        read_initial_descriptors(tmp_path / "ref", 6, 4)
    with pytest.raises(FileNotFoundError, match="no initial descriptors"):
        read_initial_descriptors(tmp_path / "missing", 5, 4)


def test_projector_initialised_from_pca_whitens():
    keras.utils.set_random_seed(0)
    embedder = Embedder(tiny_backbone(channels=8), projector_dim=8)
    embedder.build((None, None, None, 3))
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 2.0).astype(np.float32)
    init_projector_from_pca(embedder, x)
    projected = embedder.projector(x).numpy().astype(np.float64)
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(projected.T @ projected / len(x), np.eye(8), atol=1e-3)
    with pytest.raises(ValueError, match="projector"):
        init_projector_from_pca(Embedder(tiny_backbone()), x)


# -- the training loop -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tree, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    result = contrastive_loop.train(smoke_config(), tree.info_dir, tree.image_root, workdir)
    return result, workdir


def _event_tags(workdir):
    tags = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(
                    float(tf.make_ndarray(value.tensor))
                    if not value.tensor.tensor_shape.dim
                    else None
                )
    return tags


def test_two_epochs_end_to_end(tree, straight_run):
    result, workdir = straight_run
    assert result.finished and result.epochs_completed == 2 and result.global_step == 4
    assert [e["epoch"] for e in result.history] == [1, 2]
    for entry in result.history:
        assert entry["pairs"]["pairs"] == 16 and entry["pairs"]["negatives"] == 8
        assert 0.0 <= entry["val_gap"] <= entry["val_gap_minus"] + 1e-9 <= 1.0 + 1e-9
        assert np.isfinite(entry["loss"]) and entry["loss"] > 0
    assert [e["learning_rate"] for e in result.history] == pytest.approx([1e-4, 1e-5])
    with open(os.path.join(workdir, "history.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(result.history))

    tags = _event_tags(workdir)
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/gem_p",
        "epoch/loss",
        "val/gap",
        "val/gap_minus",
        "val/acc",
        "pairs/positive_distance",
        "pairs/negative_distance",
        "pairs/active_negatives",
        "pairs/synthetic_positives",
    ):
        assert tag in tags, tag
    assert len(tags["train/loss"]) == 4
    assert tags["val/gap"] == pytest.approx([e["val_gap"] for e in result.history])

    # The final model is what was validated: extracting with it (as tfmet-extract --model
    # does) reproduces the last epoch's validation descriptors.
    model = keras.saving.load_model(result.model_path)
    assert isinstance(model, Embedder)
    val = store_lib.read_store(os.path.join(workdir, "descriptors", "epoch_2"), "val")
    extractor = DescriptorExtractor(model, scales=(1.0,))
    for row, entry in enumerate(tree.val[:3]):
        image, _ = read_image(tree.image_path(entry["path"]))
        np.testing.assert_allclose(
            extractor(image[None]).numpy()[0], val.descriptors[row], atol=1e-5
        )
    assert os.path.isfile(result.backbone_weights_path)


def test_resumed_run_matches_an_uninterrupted_one(tree, straight_run, tmp_path):
    expected, straight_dir = straight_run
    workdir = str(tmp_path / "resumed")
    # Stop mid-epoch 2 (step 3 of 4): epoch 2's pairs were mined from epoch 1's descriptors.
    first = contrastive_loop.train(
        smoke_config(stop_at_step=3), tree.info_dir, tree.image_root, workdir
    )
    assert not first.finished and first.global_step == 3 and first.epochs_completed == 1
    with pytest.raises(ValueError, match="already holds checkpoints"):
        contrastive_loop.train(smoke_config(), tree.info_dir, tree.image_root, workdir)
    with pytest.raises(ValueError, match="margin"):
        contrastive_loop.train(
            smoke_config(margin=1.0), tree.info_dir, tree.image_root, workdir, resume=True
        )
    resumed = contrastive_loop.train(
        smoke_config(), tree.info_dir, tree.image_root, workdir, resume=True
    )
    assert resumed.finished and resumed.global_step == 4
    for a, b in zip(expected.history, resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["pairs"] == b["pairs"]
    straight_model = keras.saving.load_model(expected.model_path)
    resumed_model = keras.saving.load_model(resumed.model_path)
    for a, b in zip(straight_model.variables, resumed_model.variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert straight_dir != workdir


def test_pca_projector_needs_more_images_than_dimensions(tree, tmp_path):
    # 8 database images cannot whiten 64-dimensional descriptors: a clear error before training.
    config = smoke_config(emb_proj=True, pca=True)
    with pytest.raises(ValueError, match="non-zero eigenvalues"):
        contrastive_loop.train(config, tree.info_dir, tree.image_root, str(tmp_path / "pca"))
    with pytest.raises(ValueError, match="needs `emb_proj`"):
        contrastive_loop.train(
            smoke_config(pca=True), tree.info_dir, tree.image_root, str(tmp_path / "p")
        )


def test_a_refused_start_writes_nothing_so_its_retry_works(tree, tmp_path):
    # Initial descriptors of the wrong dimension: refused before config.json or a checkpoint
    # exists, so the corrected command (and --resume) are not blocked by the failed start.
    bad = tmp_path / "bad_init"
    from tfmet.data import met

    count = len(met.load_split(tree.info_dir, "train"))
    store_lib.write_store(bad, "train", np.zeros((count, 3), np.float32))
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="initial descriptors have shape"):
        contrastive_loop.train(
            smoke_config(), tree.info_dir, tree.image_root, workdir, init_descr=str(bad)
        )
    assert not os.path.exists(workdir)
    with pytest.raises(ValueError, match=r"has no entry `epoks` \(did you mean `epochs`\?\)"):
        config = smoke_config()
        config.epoks = 3
        contrastive_loop.train(config, tree.info_dir, tree.image_root, workdir)
    assert not os.path.exists(workdir)
