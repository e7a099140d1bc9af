"""tfmet-train-style / tfmet-evaluate-style / tfmet-predict end to end, and the configs' variants.

The programs run in subprocesses (absl flags are process-global), on the smoke config exactly as
the config's docstring shows, with a corrupt image added to the generated dataset.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import pandora18k, wikipaintings_rasta
from tests.kit import one_conv_backbone, run_cli, style_data
from tfmet.data import style_images
from tfmet.export import save_module
from tfmet.export.style_classifier import StyleModule
from tfmet.training.style import checkpoints, trained_run
from tfmet.training.style import predict as style_predict
from tfmet.training.style import run as style_run
from tfmet.training.style.model import StyleClassifier, StyleHead


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data, workdir, cache = str(base / "pandora"), str(base / "run"), str(base / "cache")
    style_data.make_pandora18k(data, num_classes=4, artists=2, images_per_artist=8, size=32)
    style_data.write_corrupt(os.path.join(data, style_data.MOVEMENTS[1], "artist_1_0", "bad.jpg"))
    result = run_cli(
        "train_style",
        "--config",
        "configs/pandora18k.py:smoke",
        f"--config.dataset.root={data}",
        f"--config.cache_dir={cache}",
        "--config.train.learning_rate=0.1",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return data, workdir, result


@pytest.mark.slow
def test_train_cli_reports_bad_image_and_writes_the_run(trained):
    _, workdir, result = trained
    assert "bottleneck: best val top-1" in result.stdout
    assert "Skipping unreadable image" in result.stderr and "bad.jpg" in result.stderr
    with open(os.path.join(workdir, "bad_images.json")) as f:
        bad = json.load(f)
    assert [b["path"] for b in bad] == [f"{style_data.MOVEMENTS[1]}/artist_1_0/bad.jpg"]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["best_val_top1"] >= 0.75
    for name in ("classifier.keras", "split.json", "config.json", "checkpoints/state.json"):
        assert os.path.exists(os.path.join(workdir, name))


@pytest.mark.slow
def test_evaluate_and_predict_cli(trained):
    data, workdir, _ = trained
    result = run_cli("evaluate_style", f"--workdir={workdir}", "--split=val", "--outliers_k=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val style" in result.stdout and "flip-bagged: top-1" in result.stdout
    with open(os.path.join(workdir, "eval_val", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["attributes"]["style"]["top5"] == 1.0  # 4 classes
    assert os.path.exists(os.path.join(workdir, "eval_val", "outliers_style.csv"))

    image = os.path.join(data, style_data.MOVEMENTS[2], "artist_2_0", "painting_00.jpg")
    missing = os.path.join(data, "missing.jpg")
    result = run_cli(
        "predict", f"--model={workdir}", "--top_k=3", "--json", "--nearest=2", image, missing
    )
    assert result.returncode == 2  # one input was bad
    assert f"tfmet-predict: skipped {missing}: file not found" in result.stderr.splitlines()
    (line,) = result.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["image"] == image
    probabilities = [p["probability"] for p in record["style"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert {p["label"] for p in record["style"]} <= set(style_data.MOVEMENTS)
    # The same numbers from the library (checkpoint path = the run's classifier.keras).
    predictor = style_predict.load_predictor(os.path.join(workdir, "classifier.keras"))
    images, _, _ = style_predict.read_images([image], predictor.image_size)
    expected = predictor.probabilities(images)["style"][0]
    assert probabilities[0] == pytest.approx(float(expected.max()), rel=1e-5)
    assert len(record["nearest"]) == 2 and record["nearest"][0]["similarity"] <= 1.0 + 1e-5


@pytest.mark.slow
def test_predict_from_a_checkpoint_and_missing_export(trained, tmp_path):
    _, workdir, _ = trained
    from_keras = style_predict.load_predictor(workdir)
    from_checkpoint = style_predict.load_predictor(
        os.path.join(workdir, "checkpoints", "best.weights.npz")
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        from_checkpoint.probabilities(images)["style"],
        from_keras.probabilities(images)["style"],
        rtol=1e-5,
        atol=1e-6,
    )
    empty = tmp_path / "export"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="export the model with tfmet-export first"):
        style_predict.load_predictor(str(empty))


def test_predict_from_an_exported_saved_model(tmp_path):
    backbone = one_conv_backbone()
    classifier = StyleClassifier(backbone, StyleHead({"style": ["a", "b", "c"]}))
    classifier.build((None, 32, 32, 3))
    module = StyleModule(classifier, image_size=32, top_k=2)
    metadata = {"kind": "style", "class_names": classifier.class_names, "image_size": 32}
    export = save_module(module, tmp_path / "saved_model", module.signatures(), metadata)
    predictor = style_predict.load_predictor(export)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = keras.ops.softmax(classifier(images)["style"]).numpy()
    np.testing.assert_allclose(
        predictor.probabilities(images)["style"], expected, rtol=1e-5, atol=1e-6
    )
    bagged = predictor.probabilities(images, flip_bagging=True)["style"]
    mirrored = keras.ops.softmax(classifier(images[:, :, ::-1])["style"]).numpy()
    np.testing.assert_allclose(bagged, (expected + mirrored) / 2, rtol=1e-5, atol=1e-6)

    # The bytes signature decodes, resizes as training does, and ranks the classes.
    photo = np.random.default_rng(2).integers(0, 256, (40, 28, 3), dtype=np.uint8)
    png = tf.io.encode_png(photo).numpy()
    served = tf.saved_model.load(export).signatures["serving_default"](
        image_bytes=tf.constant([png, b"broken"])
    )
    resized = style_images.resize_image(tf.constant(photo, tf.float32), 32)[None]
    probs = keras.ops.softmax(classifier(resized)["style"]).numpy()[0]
    np.testing.assert_allclose(served["style_probabilities"].numpy()[0], probs, atol=1e-6)
    best = np.argsort(-probs, kind="stable")[:2]
    assert served["style_top_k_labels"].numpy()[0].tolist() == [
        ["a", "b", "c"][i].encode() for i in best
    ]
    assert served["valid"].numpy().tolist() == [True, False]
    assert served["style_top_k_labels"].numpy()[1].tolist() == [b"", b""]


def test_an_export_whose_metadata_or_graph_is_broken_is_refused(tmp_path):
    import json
    import shutil

    classifier = StyleClassifier(one_conv_backbone(), StyleHead({"style": ["a", "b", "c"]}))
    classifier.build((None, 32, 32, 3))
    module = StyleModule(classifier, image_size=32, top_k=2)
    metadata = {"kind": "style", "class_names": classifier.class_names, "image_size": 32}
    export = save_module(module, tmp_path / "saved_model", module.signatures(), metadata)
    meta_file = os.path.join(export, "assets", "tfmet_metadata.json")

    def tampered(name, **changes):
        copy = str(tmp_path / name)
        shutil.copytree(export, copy)
        with open(os.path.join(copy, "assets", "tfmet_metadata.json"), "w") as f:
            json.dump(dict(json.load(open(meta_file)), **changes), f)
        return copy

    with pytest.raises(ValueError, match="metadata says image_size 64, the graph takes 32x32"):
        style_predict.load_predictor(tampered("size", image_size=64))
    with pytest.raises(ValueError, match="lists 2 class names for 'style', the model has 3"):
        style_predict.load_predictor(tampered("names", class_names={"style": ["a", "b"]}))
    truncated = tampered("truncated")
    pb = os.path.join(truncated, "saved_model.pb")
    with open(pb, "r+b") as f:
        f.truncate(os.path.getsize(pb) // 2)
    with pytest.raises(ValueError, match="truncated: not a loadable SavedModel"):
        style_predict.load_predictor(truncated)


def test_rasta_smoke_finetunes_top_block_with_augmentation(tmp_path):
    """The RASTA smoke config on generated list files, fine-tuning layer4 with flips."""
    data = str(tmp_path / "rasta")
    style_data.make_wikipaintings(data, num_classes=3, per_split=(6, 2, 2), size=32)
    config = wikipaintings_rasta.get_config("smoke")
    config.dataset.root = data
    config.cache_dir = str(tmp_path / "cache")
    config.train.update(trainable_blocks=1, augment="flip", epochs=2, batch_size=6)
    workdir = str(tmp_path / "run")
    initial = style_run.build_classifier(config.model.to_dict(), {"style": ["a", "b", "c"]}, 0)
    summary = style_run.train(config, workdir)
    assert summary["mode"] == "finetune" and summary["epochs_run"] == 2
    with open(os.path.join(workdir, "split.json")) as f:
        assert json.load(f)["counts"] == {"train": 18, "val": 6, "test": 6}  # the lists' split
    trained_model = trained_run.load_classifier(workdir)

    def weight(model, name):
        return model.backbone.get_layer(name).get_weights()[0]

    assert not np.array_equal(
        weight(trained_model, "layer4.0.conv1"), weight(initial, "layer4.0.conv1")
    )
    for name in ("layer3.0.conv1", "conv1", "layer4.0.bn1"):
        np.testing.assert_array_equal(weight(trained_model, name), weight(initial, name))
    config.train.epochs = 3
    resumed = style_run.train(config, workdir, resume=True)
    assert resumed["epochs_run"] == 3
    assert [h["epoch"] for h in checkpoints.read_state(workdir)["history"]] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["flip", "flip_crop", "randaugment"])
def test_augmenters_keep_shape_and_range_eagerly_and_in_tf_data(kind):
    images = tf.random.stateless_uniform([4, 24, 24, 3], seed=(0, 1), maxval=255.0)
    augment = style_images.make_augmenter(kind, 24, seed=1)
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(augment))).numpy()
    outputs = [mapped]
    if kind != "randaugment":  # (RandAugment eagerly costs seconds; training runs it in tf.data)
        outputs.append(augment(images).numpy())
    for out in outputs:
        assert out.shape == (4, 24, 24, 3)
        assert out.min() >= 0.0 and out.max() <= 255.0
    if kind == "flip":  # every image is itself or its mirror image
        for a, b in zip(outputs[1], images.numpy(), strict=True):
            assert np.allclose(a, b) or np.allclose(a, b[:, ::-1])
    assert style_images.make_augmenter("none", 24) is None


def test_config_variants_and_bad_input(tmp_path):
    for module, variants in (
        (pandora18k, ("finetune", "smoke")),
        (wikipaintings_rasta, ("top20", "smoke")),
    ):
        assert module.get_config().dataset.root == ""
        for variant in variants:
            config = module.get_config(variant)
            assert style_run.resolve_mode(config.train.to_dict()) in ("bottleneck", "finetune")
        with pytest.raises(ValueError, match="Unknown"):
            module.get_config("nope")
        assert "tfmet-train-style --config configs/" in module.__doc__
    config = pandora18k.get_config("smoke")
    config.dataset.root = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        style_run.train(config, str(tmp_path / "run"))
    config.train.mode = "bottleneck"
    config.train.trainable_blocks = 1
    with pytest.raises(ValueError, match="cannot train backbone blocks"):
        style_run.resolve_mode(config.train.to_dict())
