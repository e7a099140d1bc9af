"""tfmet-convert-weights for ViTs: checkpoint directories and DINOv2 torch-hub .pth files."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.kit import vit_models
from tfmet import backbones

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _convert(*args):
    command = [sys.executable, "-m", "tfmet.cli.convert_weights", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def _as_torch_hub(model, directory):
    """The state dict a DINOv2 torch-hub model of the same weights has (fused qkv, hub names)."""
    from safetensors.torch import load_file

    hf = load_file(os.path.join(directory, "model.safetensors"))  # the saved (checkpoint) names
    out = {
        "cls_token": hf.pop("embeddings.cls_token"),
        "mask_token": hf.pop("embeddings.mask_token"),
        "register_tokens": hf.pop("embeddings.register_tokens"),
        "pos_embed": hf.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": hf.pop("layernorm.weight"),
        "norm.bias": hf.pop("layernorm.bias"),
    }
    for i in range(model.config.num_hidden_layers):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [
                hf.pop(f"{p}attention.attention.{n}.{kind}") for n in ("query", "key", "value")
            ]
            out[f"{q}attn.qkv.{kind}"] = torch.cat(parts, 0)
            out[f"{q}attn.proj.{kind}"] = hf.pop(f"{p}attention.output.dense.{kind}")
            for norm in ("norm1", "norm2"):
                out[f"{q}{norm}.{kind}"] = hf.pop(f"{p}{norm}.{kind}")
            for fc in ("fc1", "fc2"):
                out[f"{q}mlp.{fc}.{kind}"] = hf.pop(f"{p}mlp.{fc}.{kind}")
        out[f"{q}ls1.gamma"] = hf.pop(f"{p}layer_scale1.lambda1")
        out[f"{q}ls2.gamma"] = hf.pop(f"{p}layer_scale2.lambda1")
    assert not hf, sorted(hf)
    return out


def test_torch_hub_file_and_directory_convert_to_the_same_model(tmp_path):
    model = vit_models.make_model("dinov2_with_registers", tmp_path / "ckpt")
    arch = f"hf:{tmp_path / 'ckpt'}"
    torch.save(_as_torch_hub(model, tmp_path / "ckpt"), tmp_path / "hub.pth")
    for source, out in (
        (tmp_path / "hub.pth", "hub.weights.h5"),
        (tmp_path / "ckpt", "d.weights.h5"),
    ):
        result = _convert(f"--from={source}", f"--arch={arch}", f"--out={tmp_path / out}")
        assert result.returncode == 0, result.stderr[-3000:]
        transformer = backbones.get(arch, weights=str(tmp_path / out))
        pixels = np.random.RandomState(0).randn(1, 50, 36, 3).astype(np.float32)
        np.testing.assert_allclose(
            transformer(pixels).numpy(), vit_models.torch_tokens(model, pixels), atol=1e-4
        )

    del_key = _as_torch_hub(model, tmp_path / "ckpt")
    del del_key["blocks.1.ls2.gamma"]
    torch.save(del_key, tmp_path / "short.pth")
    result = _convert(
        f"--from={tmp_path / 'short.pth'}", f"--arch={arch}", f"--out={tmp_path / 'x.weights.h5'}"
    )
    assert result.returncode == 2
    assert "missing tensor 'encoder.layer.1.layer_scale2.lambda1'" in result.stderr
