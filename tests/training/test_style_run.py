"""style run and trained_run on procedural styles: train, evaluate, TensorBoard, resume.

The other style modules' tests sit beside this file (test_style_<module>.py)."""

import glob
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import pandora18k
from tests.kit.style_data import NUM_CLASSES
from tfmet.training.style import checkpoints, trained_run
from tfmet.training.style import evaluate as style_eval
from tfmet.training.style import predict as style_predict
from tfmet.training.style import run as style_run


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
    reports = trained_run.evaluate(workdir, split="test", flip_bagging=True, outliers_k=3)
    report = reports["style"]
    # Recompute top-1 independently: classifier on decoded images, numpy argmax.
    records = style_run.load_records(trained_run.read_run_config(workdir)["dataset"])
    split = style_run.load_split(trained_run.read_run_config(workdir)["dataset"], records, workdir)
    classifier = trained_run.load_classifier(workdir)
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
    reports = trained_run.evaluate(workdir, split="val", flip_bagging=False)
    assert set(reports) == {"style", "artist"}
    records = style_run.load_records(config.dataset.to_dict())
    split = style_run.load_split(config.dataset.to_dict(), records, workdir)
    assert (records.labels["artist"] == -1).sum() == 2  # the loose images
    artists = records.labels["artist"][split["val"]]
    assert reports["artist"]["count"] == int((artists >= 0).sum())
    assert len(reports["artist"]["per_class"]) == NUM_CLASSES * 2
    state = checkpoints.read_state(workdir)
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
    state = checkpoints.read_state(workdir)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    # The optimizer state came back: its step counter covers all four epochs.
    with open(os.path.join(workdir, "split.json")) as f:
        steps_per_epoch = int(np.ceil(json.load(f)["counts"]["train"] / 32))
    with np.load(checkpoints.checkpoint_paths(workdir)["optimizer"]) as opt:
        assert int(opt["0"]) == 4 * steps_per_epoch  # variable 0 is the iteration counter
