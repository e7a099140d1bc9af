"""tfmet-export end to end: exports load without tfmet; saved_model_cli reads and runs them."""

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from tests.kit import one_conv_backbone, run_cli, run_command
from tfmet.descriptors import extraction
from tfmet.descriptors import spec as spec_lib

pytestmark = pytest.mark.slow  # every test runs the program in a subprocess

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _run(args, cwd=None):
    return run_command(args, cwd=cwd)


def _export(*args):
    return run_cli("export", *args, cwd=None)


def _saved_model_cli_run(export, signature, inputs, outdir):
    """`saved_model_cli run` of one signature; returns the completed process."""
    return _run(
        [SAVED_MODEL_CLI, "run", "--dir", str(export), "--tag_set", "serve"]
        + ["--signature_def", signature, "--inputs", inputs, "--outdir", str(outdir)]
    )


def _image(seed, size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_descriptor_export_cli_and_saved_model_cli(tmp_path):
    out = tmp_path / "descriptor"
    # The 20 x 30 PNG served below is exactly at the pixel limit.
    result = _export(
        "--kind=descriptor",
        "--backbone=resnet_tiny",
        "--seed=3",
        f"--out={out}",
        "--max_pixels=600",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "assets" / "tfmet_metadata.json") as f:
        metadata = json.load(f)
    assert metadata["backbone"] == "resnet_tiny" and metadata["weights_sha256"] == "random:seed=3"
    assert (metadata["max_pixels"], metadata["max_bytes"]) == (600, 64 * 1024 * 1024)

    # The same descriptor as the extraction library computes in-process.
    extractor, _ = spec_lib.build_extractor(backbone="resnet_tiny", seed=3)
    image = _image(0, (45, 37)).astype(np.float32)
    expected = extractor(image[None]).numpy()
    np.save(tmp_path / "images.npy", image[None])

    show = _run([SAVED_MODEL_CLI, "show", "--dir", str(out), "--all"])
    assert show.returncode == 0, show.stderr[-2000:]
    for needle in ("serving_default", "image_bytes", "descriptor", "valid", "metadata"):
        assert needle in show.stdout

    ran = _saved_model_cli_run(
        out, "images", f"images={tmp_path / 'images.npy'}", tmp_path / "cli_out"
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    got = np.load(tmp_path / "cli_out" / "descriptor.npy")
    np.testing.assert_allclose(got, expected, atol=1e-5)

    buffer = io.BytesIO()
    Image.fromarray(_image(1, (20, 30))).save(buffer, format="PNG")
    # Fixed-width bytes (no pickle); a PNG ends with its IEND CRC, never with a NUL byte.
    np.save(tmp_path / "bytes.npy", np.array([buffer.getvalue(), b""]), allow_pickle=False)
    ran = _saved_model_cli_run(
        out, "serving_default", f"image_bytes={tmp_path / 'bytes.npy'}", tmp_path / "cli_bytes"
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert np.load(tmp_path / "cli_bytes" / "valid.npy").tolist() == [True, False]
    expected = extractor(_image(1, (20, 30)).astype(np.float32)[None]).numpy()[0]
    np.testing.assert_allclose(
        np.load(tmp_path / "cli_bytes" / "descriptor.npy")[0], expected, atol=1e-5
    )

    again = _export("--kind=descriptor", "--backbone=resnet_tiny", f"--out={out}")
    assert again.returncode == 2 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind=recognizer", "--out=x"], "--descriptor_dir and --info_dir"),
        (["--kind=style", "--out=x"], "--style_model"),
        (["--kind=descriptor", "--out=x", "--backbone=nope"], "Unknown backbone 'nope'"),
        (["--kind=style", "--out=x", "--max_bytes=0"], "--max_bytes must be a positive integer"),
        (
            [
                "--kind=recognizer",
                "--out=x",
                "--descriptor_dir=d",
                "--info_dir=i",
                "--searcher=faiss",
            ],
            "--searcher=faiss: value should be one of <exact|scann>",
        ),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    result = _run([sys.executable, "-m", "tfmet.cli.export", *args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_style_export_cli_from_a_run_directory(tmp_path):

    from tfmet.training.style.model import StyleClassifier, StyleHead

    backbone = one_conv_backbone()
    names = {"style": ["baroque", "cubism", "pop_art"], "genre": ["portrait", "landscape"]}
    classifier = StyleClassifier(backbone, StyleHead(names))
    classifier.build((None, 24, 24, 3))
    run = tmp_path / "run"
    run.mkdir()
    classifier.save(run / "classifier.keras")
    with open(run / "config.json", "w") as f:
        json.dump({"model": {"image_size": 24}}, f)
    out = tmp_path / "style"
    result = _export("--kind=style", f"--style_model={run}", "--top_k=2", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "assets" / "tfmet_metadata.json") as f:
        metadata = json.load(f)
    assert metadata["class_names"] == names and metadata["image_size"] == 24

    import tensorflow as tf

    served = tf.saved_model.load(str(out)).signatures["images"]
    images = np.random.default_rng(0).uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    logits = served(images=tf.constant(images))
    for attribute in names:
        np.testing.assert_allclose(
            logits[attribute].numpy(), classifier(images)[attribute].numpy(), atol=1e-5
        )


def test_recognizer_export_predicts_what_knn_eval_predicts(tmp_path):
    """extract -> tfmet-knn-eval --autotune -> tfmet-export: the same test predictions."""
    import tensorflow as tf

    from tests.kit.met_tree import write_met_tree
    from tfmet.data import met

    tree = write_met_tree(tmp_path / "met", num_exhibits=6, met_queries=6)
    desc = tmp_path / "desc"
    extractor, spec = spec_lib.build_extractor(backbone="resnet_tiny", seed=1)
    splits = extraction.load_met_splits(tree.info_dir)
    extraction.extract_met(extractor, spec, splits, tree.image_root, str(desc), progress=False)

    knn = _run(
        [
            sys.executable,
            "-m",
            "tfmet.cli.knn_eval",
            str(desc),
            f"--info_dir={tree.info_dir}",
            "--autotune",
            "--dim=8",
            f"--output_dir={tmp_path / 'knn'}",
        ]
    )
    assert knn.returncode == 0, knn.stderr[-2000:]
    results = tmp_path / "knn" / "knn_results.json"
    out = tmp_path / "recognizer"
    result = _export(
        "--kind=recognizer",
        "--backbone=resnet_tiny",
        "--seed=1",
        f"--descriptor_dir={desc}",
        f"--info_dir={tree.info_dir}",
        f"--results_json={results}",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(results) as f:
        tuned = json.load(f)
    with open(out / "assets" / "tfmet_metadata.json") as f:
        metadata = json.load(f)
    assert (metadata["k"], metadata["tau"], metadata["dim"]) == (
        min(tuned["k"], metadata["database_size"]),
        tuned["t"],
        8,
    )

    test = met.load_split(tree.info_dir, "test")
    images = [open(met.resolve_image_path(tree.image_root, p), "rb").read() for p in test.paths]
    served = tf.saved_model.load(str(out)).signatures["serving_default"](
        image_bytes=tf.constant(images)
    )
    expected = np.load(tmp_path / "knn" / "knn_predictions.npz")
    np.testing.assert_array_equal(served["met_id"].numpy(), expected["test_pred"])
    np.testing.assert_allclose(served["confidence"].numpy(), expected["test_conf"], atol=1e-5)

    # The operating threshold: chosen on val by max F1, reported on test, carried by the export.
    from tfmet.metrics import operating_point

    block = tuned["threshold"]
    value, val_metrics = operating_point.choose_threshold(
        expected["val_pred"], expected["val_conf"], expected["val_labels"]
    )
    assert block["rule"] == "max_f1" and block["value"] == value
    assert block["val"] == pytest.approx(val_metrics)
    assert block["test"] == pytest.approx(
        operating_point.evaluate_threshold(
            expected["test_pred"], expected["test_conf"], expected["test_labels"], value
        )
    )
    assert (tmp_path / "knn" / "knn_threshold.png").read_bytes()[:4] == b"\x89PNG"
    assert metadata["threshold"] == float(np.float32(value))
    assert (metadata["threshold_rule"], metadata["threshold_source"]) == ("max_f1", str(results))
    threshold = np.float32(metadata["threshold"])
    np.testing.assert_array_equal(
        served["accepted"].numpy(), served["confidence"].numpy() >= threshold
    )
