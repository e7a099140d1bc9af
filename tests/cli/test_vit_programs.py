"""ViT backbones through the programs: tfmet-extract, tfmet-export, bad checkpoint directories."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.kit import vit_models
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store
from tfmet.data import images as image_io
from tfmet.data import met
from tfmet.descriptors import MET_SCALES, extraction
from tfmet.descriptors import spec as spec_lib

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600
    )


def _torch_multiscale(model, image):
    """The Met multi-scale cls descriptor of one [H, W, 3] image in [0, 255], all in PyTorch."""
    pixels = torch.from_numpy(((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].copy())
    total = 0
    with torch.no_grad():
        for scale in MET_SCALES:
            scaled = pixels
            if scale != 1.0:
                scaled = torch.nn.functional.interpolate(
                    pixels, scale_factor=scale, mode="bilinear", align_corners=False
                )
            cls = model(pixel_values=scaled).pooler_output
            total = total + torch.nn.functional.normalize(cls, dim=1)
    return torch.nn.functional.normalize(total / len(MET_SCALES), dim=1)[0].numpy()


def test_extract_cli_multiscale_matches_a_pytorch_pipeline(tmp_path):
    model = vit_models.make_model("dinov2_with_registers", tmp_path / "ckpt")
    tree = write_met_tree(
        tmp_path / "met", num_exhibits=2, met_queries=2, sizes=((45, 61), (70, 52))
    )
    out = tmp_path / "desc"
    result = _run(
        "-m",
        "tfmet.cli.extract",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        f"--output_dir={out}",
        f"--backbone=hf:{tmp_path / 'ckpt'}",
        "--multiscale",
        "--splits=val",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    val = store.read_store(str(out), "val")
    split = met.load_split(tree.info_dir, "val")
    paths = met.image_paths(split, tree.image_root)
    assert len(paths) == len(val.descriptors) > 0
    for path, row in zip(paths, val.descriptors, strict=True):
        image, reason = image_io.read_image(path)
        assert reason == ""
        np.testing.assert_allclose(row, _torch_multiscale(model, image.numpy()), atol=1e-4)
    weights = os.path.join(tmp_path, "ckpt", "model.safetensors")
    assert val.manifest["weights_sha256"] == spec_lib.weights_fingerprint(weights)


RELOAD = """
import sys, numpy as np, tensorflow as tf
sys.modules["tfmet"] = None  # the export must not need tfmet (nor keras-hub)
sys.modules["keras_hub"] = None
loaded = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = loaded.signatures["images"](images=tf.constant(images))
np.save(sys.argv[3], out["descriptor"].numpy())
"""


def test_recognizer_export_with_a_vit_reloads_without_tfmet(tmp_path):
    vit_models.make_model("dinov3_vit", tmp_path / "ckpt")
    backbone = f"hf:{tmp_path / 'ckpt'}"
    tree = write_met_tree(tmp_path / "met", num_exhibits=3, met_queries=2)
    desc = tmp_path / "desc"
    extractor, spec = spec_lib.build_extractor(backbone=backbone)
    splits = extraction.load_met_splits(tree.info_dir, ("train",))
    extraction.extract_met(extractor, spec, splits, tree.image_root, str(desc), progress=False)
    export = tmp_path / "recognizer"
    result = _run(
        "-m",
        "tfmet.cli.export",
        "--kind=recognizer",
        f"--backbone={backbone}",
        f"--descriptor_dir={desc}",
        f"--info_dir={tree.info_dir}",
        "--raw",
        "--k=2",
        "--tau=10",
        f"--out={export}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(export / "assets" / "tfmet_metadata.json") as f:
        assert json.load(f)["backbone"] == backbone

    images = np.random.default_rng(0).uniform(0, 255, (2, 53, 71, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    expected = extractor(images).numpy()
    reload = _run(
        "-c", RELOAD, str(export), str(tmp_path / "images.npy"), str(tmp_path / "out.npy"),
        cwd=tmp_path,
    )  # fmt: skip
    assert reload.returncode == 0, reload.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)

    cli = subprocess.run(
        [SAVED_MODEL_CLI, "run", "--dir", str(export), "--tag_set", "serve"]
        + ["--signature_def", "images", "--inputs", f"images={tmp_path / 'images.npy'}"]
        + ["--outdir", str(tmp_path / "cli_out")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "cli_out" / "descriptor.npy"), expected, atol=1e-5
    )


def _drop_tensor(directory, name):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["model_type", "missing_tensor", "shortcut"])
def test_bad_checkpoint_directory_one_line_exit_2(tmp_path, case):
    directory = tmp_path / "ckpt"
    vit_models.make_model("dinov2", directory)
    flags = [f"--backbone=hf:{directory}"]
    if case == "model_type":
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = "vit"
        (directory / "config.json").write_text(json.dumps(config))
        message = "model_type 'vit' is not supported"
    elif case == "missing_tensor":
        _drop_tensor(directory, "encoder.layer.1.mlp.fc2.weight")
        message = "encoder.layer.1.mlp.fc2.weight"
    else:
        flags = ["--backbone=dinov2_vitb14", f"--weights={directory}"]
        message = "not a dinov2_vitb14 checkpoint"
    tree = write_met_tree(tmp_path / "met", num_exhibits=1, met_queries=1)
    result = _run(
        "-m",
        "tfmet.cli.extract",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        f"--output_dir={tmp_path / 'out'}",
        "--splits=val",
        *flags,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
