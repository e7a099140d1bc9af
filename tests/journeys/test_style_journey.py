"""The style journey with the real embedded model, as a new user walks docs/style.md.

A Pandora18k-layout tree (`<movement>/<artist>/<image>`, two artists sharing file names, one
image loose in its movement folder) is cut from real photos: the pictures tfmet's demo uses
(`tfmet.demo.photos`: scikit-image, scikit-learn, matplotlib), cropped, mirrored and
colour-shifted. A movement here is a subject (portraits, animals and cups, landscapes), which
ImageNet features separate, so a head trained for a few epochs must get most of them right.

The programs run as the docs show them, on EfficientNet-Lite0 with its packaged ImageNet weights:
tfmet-train-style (configs/pandora18k.py:smoke, the backbone overridden), tfmet-evaluate-style,
tfmet-export --kind style on the model path training printed, tfmet-predict on the export path
the export printed. Then:
- evaluate's top-1, flip-bagged top-1, confusion matrix and per-class support are the numbers
  computed here from the run's best checkpoint, loaded by the library (a different file from the
  classifier.keras that was exported);
- tfmet-predict on the export gives that checkpoint's probabilities (< 1e-5) and label order for
  every image, and so does the export's image-bytes signature;
- the run trained the real model, not a random one: most held-out images are right.
"""

import csv
import json
import os
import pathlib
import re
import sys

import numpy as np
import pytest
from PIL import Image

from tests.kit import run_command

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)

IMAGE_SIZE = 64  # what the classifier sees; Lite0 gives a 2x2 feature map
SIDE = 96  # the written JPEGs, resized to IMAGE_SIZE by every reader
PER_ARTIST = 6
# movement -> {artist: demo photo}; the loose image has no artist.
MOVEMENTS = {
    "04_High_Renaissance": {"astronaut": "astronaut", "hopper": "grace_hopper"},
    "05_Baroque": {"cat": "chelsea", "cup": "coffee"},
    "07_Romanticism": {"flower": "flower", "temple": "china_left"},
}
LOOSE = ("07_Romanticism", "china_right")


def _variant(picture, rng, mirror):
    """A random crop (60-90% of each side) of `picture`, mirrored if asked, colour-shifted."""
    height, width = picture.shape[:2]
    h, w = (int(side * rng.uniform(0.6, 0.9)) for side in (height, width))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    crop = picture[top : top + h, left : left + w].astype(np.float64)
    if mirror:
        crop = crop[:, ::-1]
    crop = np.clip(crop * rng.uniform(0.8, 1.2, size=3), 0, 255).astype(np.uint8)
    return Image.fromarray(crop).resize((SIDE, SIDE), Image.BILINEAR)


def write_pandora18k(root):
    """The tree under `root`; returns its images' relative paths and movements."""
    from tfmet.demo.photos import load_photos

    pictures = {photo.name: photo.views[0] for photo in load_photos()}
    rng = np.random.default_rng(0)
    paths, labels = [], []
    jobs = [
        (f"{movement}/{artist}/painting_{i:02d}.jpg", movement, source, i % 2 == 1)
        for movement, artists in MOVEMENTS.items()
        for artist, source in artists.items()
        for i in range(PER_ARTIST)
    ]
    jobs.append((f"{LOOSE[0]}/loose_00.jpg", LOOSE[0], LOOSE[1], False))
    for rel, movement, source, mirror in jobs:
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        _variant(pictures[source], rng, mirror).save(os.path.join(root, rel), quality=90)
        paths.append(rel)
        labels.append(movement)
    return paths, labels


def _program(name, *args):
    """`name` from this environment's bin/, as a user types it; its stdout."""
    result = run_command([os.path.join(BIN, name), *map(str, args)])
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def _printed_path(stdout, pattern):
    """The path a program printed where `pattern`'s group is."""
    found = re.findall(pattern, stdout)
    assert len(found) == 1, f"{pattern!r} printed {len(found)} times:\n{stdout[-3000:]}"
    return found[0]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    base = tmp_path_factory.mktemp("style_journey")
    data, run = str(base / "pandora"), str(base / "run")
    paths, labels = write_pandora18k(data)
    trained = _program(
        "tfmet-train-style",
        "--config", "configs/pandora18k.py:smoke",
        f"--config.dataset.root={data}",
        "--config.dataset.split_fractions=(0.5, 0.25, 0.25)",
        "--config.model.backbone=efficientnet_lite0",
        "--config.model.weights=imagenet",
        f"--config.model.image_size={IMAGE_SIZE}",
        "--config.train.epochs=3",
        "--config.train.batch_size=8",
        f"--config.cache_dir={base / 'cache'}",
        f"--workdir={run}",
    )  # fmt: skip
    model = _printed_path(trained, r"model: (\S+)\n")
    evaluated = _program("tfmet-evaluate-style", f"--workdir={run}", "--split=test")
    exported = _program(
        "tfmet-export", "--kind=style", f"--style_model={model}", f"--out={base / 'export'}"
    )
    export = _printed_path(exported, r"exported style SavedModel to (\S+) \(")
    return dict(
        data=data, run=run, paths=paths, labels=labels, trained=trained, model=model,
        evaluated=evaluated, export=export,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(journey):
    """The run's best checkpoint, loaded by the library: (class names, image paths -> logits)."""
    from tfmet.training.style import predict as style_predict

    predictor = style_predict.load_predictor(
        os.path.join(journey["run"], "checkpoints", "best.weights.npz")
    )
    assert predictor.image_size == IMAGE_SIZE

    def logits(files, mirror=False):
        images, good, errors = style_predict.read_images(files, IMAGE_SIZE)
        assert good == list(files) and not errors
        if mirror:
            images = images[:, :, ::-1]
        return np.asarray(predictor.classifier(images, training=False)["style"])

    return predictor.class_names["style"], logits


def _softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _split(journey, name):
    with open(os.path.join(journey["run"], "split.json"), encoding="utf-8") as f:
        split = json.load(f)
    assert split["format"] == "tfmet-style-split"
    return split["splits"][name]


def test_training_reads_every_image_of_the_layout_and_reports_its_summary(journey):
    with open(os.path.join(journey["run"], "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert journey["model"] == os.path.join(journey["run"], "classifier.keras")
    assert summary["mode"] == "bottleneck" and summary["bad_images"] == 0
    assert (
        f"bottleneck: best val top-1 {summary['best_val_top1']:.4f} at epoch "
        f"{summary['best_epoch']} of {summary['epochs_run']}" in journey["trained"]
    )
    splits = {name: _split(journey, name) for name in ("train", "val", "test")}
    # Equal file names of two artists stay two images: every file is in exactly one split.
    assert sorted(sum(splits.values(), [])) == sorted(journey["paths"])
    assert summary["val_images"] == len(splits["val"])


def test_evaluate_reports_the_checkpoints_numbers(journey, checkpoint):
    class_names, logits = checkpoint
    assert class_names == sorted(MOVEMENTS)
    test = _split(journey, "test")
    label_of = dict(zip(journey["paths"], journey["labels"], strict=True))
    truth = np.array([class_names.index(label_of[p]) for p in test])
    files = [os.path.join(journey["data"], p) for p in test]
    plain = _softmax(logits(files))
    bagged = (plain + _softmax(logits(files, mirror=True))) / 2
    eval_dir = os.path.join(journey["run"], "eval_test")
    with open(os.path.join(eval_dir, "metrics.json"), encoding="utf-8") as f:
        report = json.load(f)["attributes"]["style"]
    assert report["count"] == len(test)
    # Accuracies are float32 (1e-6 off): with 1/9 between counts, still a count of images.
    assert report["top1"] == pytest.approx(np.mean(plain.argmax(1) == truth), abs=1e-6)
    assert report["flip_bagged"]["top1"] == pytest.approx(
        np.mean(bagged.argmax(1) == truth), abs=1e-6
    )
    assert report["top3"] == 1.0  # three movements
    assert f"test style ({len(test)} images): top-1 {report['top1']:.4f}" in journey["evaluated"]
    confusion = np.zeros((3, 3), np.int64)
    np.add.at(confusion, (truth, bagged.argmax(1)), 1)
    with open(os.path.join(eval_dir, "confusion_style.csv"), encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == class_names
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == confusion.tolist()
    with open(os.path.join(eval_dir, "per_class_style.csv"), encoding="utf-8") as f:
        support = {row["class"]: int(row["support"]) for row in csv.DictReader(f)}
    assert support == {name: int((truth == i).sum()) for i, name in enumerate(class_names)}
    # The real ImageNet features tell the subjects apart after three epochs of the head.
    assert report["flip_bagged"]["top1"] >= 0.75


def test_predict_on_the_export_gives_the_checkpoints_probabilities(journey, checkpoint):
    class_names, logits = checkpoint
    files = [os.path.join(journey["data"], p) for p in journey["paths"]]
    stdout = _program(
        "tfmet-predict", f"--model={journey['export']}", "--json", "--top_k=3", *files
    )
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["image"] for r in records] == files
    expected = _softmax(logits(files))
    for record, row in zip(records, expected, strict=True):
        order = np.argsort(-row, kind="stable")
        assert [p["label"] for p in record["style"]] == [class_names[i] for i in order]
        served = np.array([p["probability"] for p in record["style"]])
        assert np.abs(served - row[order]).max() < 1e-5


def test_the_exports_image_bytes_signature_gives_the_same_answers(journey, checkpoint):
    import tensorflow as tf

    class_names, logits = checkpoint
    with open(
        os.path.join(journey["export"], "assets", "tfmet_metadata.json"), encoding="utf-8"
    ) as f:
        metadata = json.load(f)
    assert metadata["kind"] == "style" and metadata["image_size"] == IMAGE_SIZE
    assert metadata["backbone"] == "efficientnet_lite0"
    assert metadata["class_names"] == {"style": class_names}
    files = [os.path.join(journey["data"], p) for p in journey["paths"]]
    serve = tf.saved_model.load(journey["export"]).signatures["serving_default"]
    out = serve(image_bytes=tf.constant([pathlib.Path(path).read_bytes() for path in files]))
    expected = _softmax(logits(files))
    assert out["valid"].numpy().all()
    assert np.abs(out["style_probabilities"].numpy() - expected).max() < 1e-5
    best = [class_names[i] for i in expected.argmax(1)]
    assert [row[0].decode() for row in out["style_top_k_labels"].numpy()] == best
