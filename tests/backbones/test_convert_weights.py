"""torch -> Keras conversion: parity of feature maps and GeM descriptors, Met layouts, errors."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmet import backbones
from tfmet.backbones import torch_convert
from tfmet.descriptors import conversion
from tfmet.layers import gem

torch = pytest.importorskip("torch")
from tests.kit import torch_models  # noqa: E402  (needs torch)
from tests.kit.cli import REPO  # noqa: E402
from tests.kit.references import numpy_gem as _numpy_gem  # noqa: E402


def _images(height, width, count=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (count, height, width, 3)).astype(np.float32)


def _torch_model(arch, seed=0):
    torch.manual_seed(seed)
    model = torch_models.resnet(arch)
    return torch_models.randomize_batchnorm(model, seed).eval()


def _torch_features(trunk, normalised):
    with torch.no_grad():
        out = trunk(torch.from_numpy(normalised).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    ("arch", "size"),
    [("resnet18", (37, 29)), ("resnet18", (45, 70)), ("resnet50", (37, 29)),
     ("resnext50_32x4d", (37, 29))],
)  # fmt: skip
def test_parity_with_torchvision_layout(tmp_path, arch, size):
    model = _torch_model(arch)
    checkpoint = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), checkpoint)  # full classifier: fc is ignored by the trunk
    if arch == "resnet18":  # the user's path: file -> tfmet-convert-weights -> backbones.get
        out = tmp_path / f"{arch}.weights.h5"
        report, metadata = conversion.convert_checkpoint(checkpoint, arch, out)
        assert metadata["kind"] == "backbone" and metadata["arch"] == arch
        keras_model = backbones.get(arch, weights=str(out))
    else:  # the same mapping, without building the (slow) bigger models twice
        keras_model = backbones.get(arch)
        report = torch_convert.load_torch_weights(keras_model, checkpoint)
    assert set(report.ignored) == {"fc.weight", "fc.bias"} | {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")
    }
    assert len(report.assigned) + len(report.ignored) == len(model.state_dict())

    normalised = backbones.preprocessing(arch)(_images(*size)).numpy()
    keras_features = keras.ops.convert_to_numpy(keras_model(normalised))
    torch_features = _torch_features(torch_models.trunk(model), normalised)
    assert keras_features.shape == torch_features.shape
    feature_diff = np.abs(keras_features - torch_features).max()
    keras_gem = keras.ops.convert_to_numpy(gem(keras_features))
    keras_gem /= np.linalg.norm(keras_gem, axis=1, keepdims=True)
    gem_diff = np.abs(keras_gem - _numpy_gem(torch_features)).max()
    scale = np.abs(torch_features).max()
    print(f"{arch} {size}: features {feature_diff:.2e} (max |x| {scale:.1f}) gem {gem_diff:.2e}")
    assert feature_diff < 1e-4 and gem_diff < 1e-4


class TorchGeM(torch.nn.Module):
    def __init__(self, p=3.0):
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(1) * p)

    def forward(self, x):
        pooled = x.clamp(min=1e-6).pow(self.p).mean((-2, -1))
        return pooled.pow(1.0 / self.p)


class TorchEmbedder(torch.nn.Module):
    """The Met reference's Embedder: trunk -> GeM -> L2 [-> Linear -> L2]."""

    def __init__(self, arch, projector=True, p=2.5):
        super().__init__()
        self.backbone = torch_models.trunk(_torch_model(arch))
        self.pool = TorchGeM(p)
        self.projector = None
        if projector:
            dim = self.backbone[-1][-1].conv2.out_channels
            self.projector = torch.nn.Linear(dim, dim)
            # The reference reshapes the bias to [1, d] before loading its checkpoints.
            self.projector.bias.data = self.projector.bias.data.unsqueeze(0)

    def forward(self, x):
        x = torch.nn.functional.normalize(self.pool(self.backbone(x)))
        if self.projector is None:
            return x
        return torch.nn.functional.normalize(self.projector(x))


class Siamese(torch.nn.Module):
    def __init__(self, embedder):
        super().__init__()
        self.backbone = embedder


def _torch_descriptors(embedder, normalised):
    with torch.no_grad():
        return embedder(torch.from_numpy(normalised).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("projector", [True, False])
def test_met_contrastive_checkpoint_gives_an_embedder(tmp_path, projector):
    torch.manual_seed(1)
    embedder = TorchEmbedder("resnet_tiny", projector=projector).eval()
    checkpoint = tmp_path / "met.pth"
    torch.save(
        {
            "epoch": 3,
            "state_dict": Siamese(embedder).state_dict(),
            "val_gap": np.float64(0.3),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-7}]},
        },
        checkpoint,
    )
    out = tmp_path / "met.weights.h5"
    saved = tmp_path / "met.keras"
    _, metadata = conversion.convert_checkpoint(checkpoint, "resnet_tiny", out, keras_model=saved)
    assert metadata["kind"] == "embedder"
    assert metadata["projector_dim"] == (64 if projector else -1)
    assert metadata["p"] == pytest.approx(2.5)
    keras_embedder = conversion.load_embedder(out)
    assert float(keras_embedder.pool.power.numpy()) == pytest.approx(2.5)
    assert (keras_embedder.projector is not None) == projector
    images = _images(37, 29)
    expected = _torch_descriptors(embedder, keras_embedder.preprocess(images).numpy())
    got = keras.ops.convert_to_numpy(keras_embedder(keras_embedder.preprocess(images)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    reloaded = keras.saving.load_model(saved)  # what tfmet-extract --model reads
    got = keras.ops.convert_to_numpy(reloaded(reloaded.preprocess(images)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_reference_extraction_sequential_layout(tmp_path):
    # extract_descriptors.py wraps the trunk as nn.Sequential(*children()[:-2], GeM(), L2N()).
    torch.manual_seed(2)
    model = _torch_model("resnet_tiny", seed=2)
    sequential = torch.nn.Sequential(*list(model.children())[:-2], TorchGeM(4.0))
    checkpoint = tmp_path / "seq.pth"
    torch.save(sequential.state_dict(), checkpoint)
    assert "8.p" in sequential.state_dict() and "4.0.conv1.weight" in sequential.state_dict()
    out = tmp_path / "seq.weights.h5"
    _, metadata = conversion.convert_checkpoint(checkpoint, "resnet_tiny", out)
    assert metadata["kind"] == "embedder" and metadata["p"] == pytest.approx(4.0)
    keras_embedder = conversion.load_embedder(out, arch="resnet_tiny")
    normalised = keras_embedder.preprocess(_images(33, 41)).numpy()
    with torch.no_grad():
        pooled = sequential(torch.from_numpy(normalised).permute(0, 3, 1, 2))
        expected = torch.nn.functional.normalize(pooled).numpy()
    got = keras.ops.convert_to_numpy(keras_embedder(normalised))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="converted for backbone 'resnet_tiny', not 'resnet18'"):
        conversion.load_embedder(out, arch="resnet18")


def test_unmapped_missing_and_misshapen_tensors_fail_loudly(tmp_path):
    state = _torch_model("resnet_tiny").state_dict()
    extra = dict(state, **{"layer5.0.conv1.weight": torch.zeros(1, 1, 1, 1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra.pth: 1 checkpoint tensors are not mapped: "
                                         r"layer5.0.conv1.weight"):  # fmt: skip
        conversion.convert_checkpoint(
            tmp_path / "extra.pth", "resnet_tiny", tmp_path / "a.weights.h5"
        )
    missing = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(
        ValueError, match=r"1 Keras weights have no tensor: layer2.0.bn1.running_var"
    ):
        conversion.convert_checkpoint(
            tmp_path / "missing.pth", "resnet_tiny", tmp_path / "b.weights.h5"
        )
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(
        ValueError, match=r"shapes differ: conv1.weight: torch shape \(8, 3, 7, 7\)"
    ):
        conversion.convert_checkpoint(tmp_path / "tiny.pth", "resnet18", tmp_path / "c.weights.h5")
    assert not list(tmp_path.glob("*.weights.h5"))  # nothing half-written


def _cli(*args):
    script = (
        "import sys; from tfmet.cli import convert_weights; sys.argv = sys.argv[1:]; "
        "convert_weights.run()"
    )
    return subprocess.run(
        [sys.executable, "-c", script, "tfmet-convert-weights", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_converts(tmp_path):
    state = _torch_model("resnet_tiny").state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ok.pth")
    out = tmp_path / "ok.weights.h5"
    done = _cli(f"--from={tmp_path / 'ok.pth'}", "--arch=resnet_tiny", f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert "backbone of resnet_tiny" in done.stdout
    assert torch_convert.read_metadata(out)["kind"] == "backbone"


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    failed = _cli(f"--from={tmp_path / 'none.pth'}", "--arch=resnet18", "--out=x.weights.h5")
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.strip()]
    assert errors == [
        f"tfmet-convert-weights: error: {tmp_path / 'none.pth'}: no such checkpoint file"
    ]
