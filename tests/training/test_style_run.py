"""Style classifier training on procedural styles: bottleneck head, fine-tuning, checkpoints."""

import glob
import json
import os
import shutil
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import pandora18k
from tests import style_data
from tfmet.data import style as style_data_module
from tfmet.training import (
    style_bottleneck,
    style_eval,
    style_finetune,
    style_predict,
    style_run,
    style_train,
)
from tfmet.training.style import (
    MaskedSparseCrossEntropy,
    StyleClassifier,
    StyleHead,
    masked_cross_entropy,
)

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("styles"))
    style_data.make_pandora18k(
        root, num_classes=NUM_CLASSES, artists=2, images_per_artist=12, size=32, seed=0
    )
    return root


def smoke_config(root, cache_dir, **train):
    config = pandora18k.get_config("smoke")
    config.dataset.root = root
    config.dataset.split_fractions = (0.5, 0.3, 0.2)
    config.cache_dir = cache_dir
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def bottleneck_run(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("bottleneck")
    workdir, cache = str(base / "run"), str(base / "cache")
    config = smoke_config(dataset, cache, epochs=8, learning_rate=0.1, batch_size=32)
    start = time.time()
    summary = style_run.train(config, workdir)
    summary["wall_seconds"] = time.time() - start
    print(f"\nbottleneck run: {summary}")
    return workdir, cache, summary


def test_bottleneck_head_learns_procedural_styles(bottleneck_run):
    workdir, _, summary = bottleneck_run
    assert summary["mode"] == "bottleneck"
    assert summary["val_images"] >= 40
    assert summary["best_val_top1"] >= 0.9
    assert os.path.exists(os.path.join(workdir, "classifier.keras"))


def test_evaluation_matches_a_direct_computation(bottleneck_run, dataset):
    workdir, _, _ = bottleneck_run
    reports = style_run.evaluate(workdir, split="test", flip_bagging=True, outliers_k=3)
    report = reports["style"]
    # Recompute top-1 independently: classifier on decoded images, numpy argmax.
    records = style_run.load_records(style_run.read_run_config(workdir)["dataset"])
    split = style_run.load_split(style_run.read_run_config(workdir)["dataset"], records, workdir)
    classifier = style_run.load_classifier(workdir)
    images, good, errors = style_predict.read_images(records.abspaths(split["test"]), 32)
    assert not errors and len(good) == report["count"]
    logits = classifier(images)["style"].numpy()
    labels = records.labels["style"][split["test"]]
    assert report["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    mirrored = classifier(images[:, :, ::-1])["style"].numpy()
    bagged = (tf.nn.softmax(logits) + tf.nn.softmax(mirrored)).numpy()
    assert report["flip_bagged"]["top1"] == pytest.approx(np.mean(bagged.argmax(1) == labels))
    out = os.path.join(workdir, "eval_test")
    for name in (
        "metrics.json",
        "per_class_style.csv",
        "confusion_style.csv",
        "confusion_style.png",
        "outliers_style.csv",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0
    matrix = np.loadtxt(
        os.path.join(out, "confusion_style.csv"),
        delimiter=",",
        skiprows=1,
        usecols=range(1, NUM_CLASSES + 1),
    )
    np.testing.assert_array_equal(
        matrix, style_eval.confusion_matrix(labels, bagged.argmax(1), NUM_CLASSES)
    )


def test_tensorboard_and_projector_outputs(bottleneck_run):
    workdir, _, summary = bottleneck_run
    logdir = os.path.join(workdir, "tensorboard")
    tags = {}
    for split in ("train", "val"):
        tags[split] = set()
        for path in glob.glob(os.path.join(logdir, split, "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                tags[split].update(v.tag for v in event.summary.value)
    assert {"loss", "style/top1", "style/top3", "style/top5", "learning_rate"} <= tags["train"]
    assert {"loss", "style/top1", "style/top3", "style/top5", "style/confusion_matrix"} <= tags[
        "val"
    ]
    with open(os.path.join(logdir, "projector_config.pbtxt")) as f:
        assert "metadata.tsv" in f.read()
    with open(os.path.join(logdir, "metadata.tsv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "path\tstyle" and len(rows) == 1 + summary["val_images"]


def test_two_attributes_style_and_artist(dataset, bottleneck_run, tmp_path):
    """Style + artist heads on the cached features; loose images have no artist (-1)."""
    _, cache, _ = bottleneck_run
    config = smoke_config(dataset, cache, epochs=2, learning_rate=0.1, batch_size=32)
    config.dataset.attributes = ("style", "artist")
    workdir = str(tmp_path / "run")
    summary = style_run.train(config, workdir)
    assert summary["mode"] == "bottleneck"
    reports = style_run.evaluate(workdir, split="val", flip_bagging=False)
    assert set(reports) == {"style", "artist"}
    records = style_run.load_records(config.dataset.to_dict())
    split = style_run.load_split(config.dataset.to_dict(), records, workdir)
    assert (records.labels["artist"] == -1).sum() == 2  # the loose images
    artists = records.labels["artist"][split["val"]]
    assert reports["artist"]["count"] == int((artists >= 0).sum())
    assert len(reports["artist"]["per_class"]) == NUM_CLASSES * 2
    state = style_train.read_state(workdir)
    assert "val/artist/top5" in state["history"][-1]


def test_resume_and_refusal_to_overwrite(dataset, bottleneck_run, tmp_path):
    _, cache, _ = bottleneck_run
    workdir = str(tmp_path / "run")
    config = smoke_config(dataset, cache, epochs=2, learning_rate=0.05, batch_size=32, patience=0)
    first = style_run.train(config, workdir)
    assert first["epochs_run"] == 2
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        style_run.train(config, workdir)
    changed = smoke_config(dataset, cache, epochs=4, learning_rate=0.5, batch_size=32, patience=0)
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        style_run.train(changed, workdir, resume=True)
    longer = smoke_config(dataset, cache, epochs=4, learning_rate=0.05, batch_size=32, patience=0)
    resumed = style_run.train(longer, workdir, resume=True)
    assert resumed["epochs_run"] == 4
    state = style_train.read_state(workdir)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    # The optimizer state came back: its step counter covers all four epochs.
    with open(os.path.join(workdir, "split.json")) as f:
        steps_per_epoch = int(np.ceil(json.load(f)["counts"]["train"] / 32))
    with np.load(style_train.checkpoint_paths(workdir)["optimizer"]) as opt:
        assert int(opt["0"]) == 4 * steps_per_epoch  # variable 0 is the iteration counter


def test_monitor_scalars_and_early_stopping(tmp_path):
    """Fabricated validation logits: top-1 0.5, 0.75, 0.75, 0.5 -> best epoch 2, stop after 4."""
    head = StyleHead({"style": ["a", "b"]})
    head.build((None, 3))
    style_train.compile_for_attributes(head, ["style"], keras.optimizers.SGD(0.01))
    head.optimizer.build(head.trainable_variables)
    labels = np.array([0, 0, 1, 1])
    good, bad = [5.0, 0.0], [0.0, 5.0]
    rows = [
        [good, bad, bad, good],
        [good, good, bad, good],
        [good, good, good, bad],
        [bad, bad, bad, bad],
    ]
    epochs = iter(rows)
    features = np.eye(4, 3, dtype=np.float32)

    def evaluate(model):
        return {"style": np.array(next(epochs), np.float32)}, features

    workdir = str(tmp_path)
    monitor = style_train.StyleMonitor(
        workdir,
        evaluate,
        {"style": labels},
        head.class_names,
        patience=2,
        projector_metadata=(["path", "style"], [[f"img{i}.jpg", "a"] for i in range(4)]),
    )
    monitor.set_model(head)
    for epoch in range(4):
        logs = {"loss": 1.0 - epoch / 10, "style_top1": 0.25 * epoch}
        monitor.on_epoch_end(epoch, logs)
        if head.stop_training:
            break
    monitor.on_train_end()
    assert epoch == 3 and head.stop_training
    state = style_train.read_state(workdir)
    assert (state["best_epoch"], state["best_top1"], state["epoch"]) == (2, 0.75, 4)
    assert [h["val/style/top1"] for h in state["history"]] == [0.5, 0.75, 0.75, 0.5]
    values = {}
    for split in ("train", "val"):
        for path in glob.glob(os.path.join(workdir, "tensorboard", split, "events.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for v in event.summary.value:
                    if v.metadata.plugin_data.plugin_name == "scalars":
                        value = float(tf.make_ndarray(v.tensor))
                        values.setdefault((split, v.tag), []).append((event.step, value))
    assert values[("val", "style/top1")] == [(1, 0.5), (2, 0.75), (3, 0.75), (4, 0.5)]
    assert [v for _, v in values[("train", "style/top1")]] == [0.0, 0.25, 0.5, 0.75]
    np.testing.assert_allclose([v for _, v in values[("train", "learning_rate")]], [0.01] * 4)
    val_loss = masked_cross_entropy(labels, np.array(rows[0], np.float32))
    assert values[("val", "loss")][0][1] == pytest.approx(val_loss, rel=1e-6)
    best = StyleHead({"style": ["a", "b"]})
    best.build((None, 3))
    style_train.load_weights(best, style_train.checkpoint_paths(workdir)["best"])
    with open(os.path.join(workdir, "tensorboard", "metadata.tsv")) as f:
        assert f.read().splitlines()[1] == "img0.jpg\ta"


def test_bottleneck_cache_reuse_by_content(dataset, tmp_path):
    paths = sorted(glob.glob(os.path.join(dataset, "*", "*", "*.jpg")))[:6]
    copy = str(tmp_path / "renamed.jpg")
    shutil.copy(paths[0], copy)
    broken = str(tmp_path / "broken.jpg")
    style_data.write_corrupt(broken)
    backbone = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Dense(4)])
    key = style_bottleneck.extractor_key("toy", backbone, "gap", 16)
    calls = []

    def feature_fn(images):
        calls.append(1)
        return tf.reduce_mean(backbone(images), axis=[1, 2])

    cache = style_bottleneck.BottleneckCache(str(tmp_path / "cache"), key)
    features, ok, errors = style_bottleneck.extract_features(
        feature_fn, paths + [broken], 16, batch_size=4, cache=cache
    )
    assert ok.tolist() == [True] * 6 + [False]
    assert [(i, os.path.basename(p)) for i, p, _ in errors] == [(6, "broken.jpg")]
    assert not np.any(features[6])
    n_calls = len(calls)
    assert n_calls > 0
    # A new cache object (a new run) on the same key: nothing is recomputed, a renamed copy is
    # found by content, values are identical.
    again = style_bottleneck.BottleneckCache(str(tmp_path / "cache"), key)
    assert len(again) == 6
    features2, ok2, _ = style_bottleneck.extract_features(
        feature_fn, [copy] + paths, 16, batch_size=4, cache=again
    )
    assert len(calls) == n_calls and ok2.all()
    np.testing.assert_array_equal(features2[1:], features[:6])
    np.testing.assert_array_equal(features2[0], features[0])
    for shard in glob.glob(os.path.join(again.path, "shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            assert data["hashes"].dtype.kind == "S" and data["features"].dtype == np.float32
    # Other weights -> another key -> another directory.
    backbone.layers[0].kernel.assign(backbone.layers[0].kernel + 1.0)
    other = style_bottleneck.extractor_key("toy", backbone, "gap", 16)
    assert other["weights_sha256"] != key["weights_sha256"]
    assert style_bottleneck.BottleneckCache(str(tmp_path / "cache"), other).path != cache.path


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
    data = style_data_module.image_dataset(
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
    assert style_finetune.backbone_blocks(backbone) == ["block2a", "block1a", "rest"]
    assert style_finetune.set_trainable(classifier, trainable_blocks=1) == ["block2a"]
    assert [v.path for v in backbone.trainable_variables] == [
        "block2a_conv/kernel",
        "block2a_conv/bias",
    ]


class _HubTrunk(tf.Module):
    """A TF-Slim-named two-block module with the reusable-SavedModel attributes."""

    variables = None
    trainable_variables = None

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.k1 = tf.Variable(
            rng.normal(size=(3, 4)).astype("float32"), name="net/block1/unit_1/conv/weights"
        )
        self.k2 = tf.Variable(
            rng.normal(size=(4, 5)).astype("float32"), name="net/block2/unit_1/conv/weights"
        )
        self.gamma = tf.Variable(np.ones(5, "float32"), name="net/block2/unit_1/BatchNorm/gamma")
        self.mean = tf.Variable(
            np.zeros(5, "float32"), trainable=False, name="net/block2/unit_1/BatchNorm/moving_mean"
        )
        self.variables = [self.k1, self.k2, self.gamma, self.mean]
        self.trainable_variables = [self.k1, self.k2, self.gamma]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.float32),
            tf.TensorSpec([], tf.bool),
        ]
    )
    def __call__(self, images, training=False):
        del training
        y = tf.nn.relu(tf.einsum("bhwc,cd->bhwd", images, self.k1))
        return tf.einsum("bhwc,cd->bhwd", y, self.k2) * self.gamma - self.mean


def test_hub_module_blocks_and_patterns(tmp_path):
    directory = str(tmp_path / "hub_module")
    tf.saved_model.save(_HubTrunk(), directory)
    classifier = StyleClassifier.from_registry(f"hub:{directory}", {"style": ["a", "b", "c"]})
    classifier.build((None, 8, 8, 3))
    assert style_finetune.backbone_blocks(classifier.backbone) == ["block2/unit_1", "block1/unit_1"]
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


def test_classifier_round_trip_gem_and_two_heads(tmp_path):
    keras.utils.set_random_seed(1)
    class_names = {"style": ["a", "b", "c"], "artist": ["x", "y"]}
    classifier = StyleClassifier.from_registry(
        "resnet_tiny", class_names, pooling="gem", dropout=0.3, name="style_classifier"
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = {a: v.numpy() for a, v in classifier(images).items()}
    assert expected["style"].shape == (2, 3) and expected["artist"].shape == (2, 2)
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.class_names == class_names and loaded.pooling == "gem"
    for a, v in loaded(images).items():
        np.testing.assert_allclose(v.numpy(), expected[a], rtol=1e-5, atol=1e-5)


def test_pooled_backbone_output_skips_pooling():
    x = keras.Input((None, None, 3))
    backbone = keras.Model(x, keras.layers.GlobalAveragePooling2D()(x))
    head = StyleHead({"style": ["a", "b"]})
    classifier = StyleClassifier(backbone, head)
    images = np.full((1, 4, 4, 3), 2.0, np.float32)
    np.testing.assert_allclose(classifier.features(images).numpy(), [[2.0, 2.0, 2.0]])


def test_masked_cross_entropy_against_numpy():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], np.float32)
    labels = np.array([0, -1, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(log_softmax[0, 0] + log_softmax[2, 1]) / 2
    assert masked_cross_entropy(labels, logits) == pytest.approx(expected, rel=1e-6)
    assert float(MaskedSparseCrossEntropy()(np.array([-1, -1]), logits[:2])) == 0.0


def test_confusion_and_precision_recall_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2, -1])
    predictions = np.array([0, 1, 1, 1, 0, 1, 2])
    matrix = style_eval.confusion_matrix(labels, predictions, 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [1, 2, 0], [0, 1, 0]])
    precision, recall, support = style_eval.precision_recall(matrix)
    np.testing.assert_allclose(precision, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(recall, [0.5, 2 / 3, 0.0])
    np.testing.assert_array_equal(support, [2, 3, 1])
    image = style_eval.confusion_image(matrix, cell=4)
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
