"""The torch-free checkpoint reader: both torch.save formats, dtypes/strides, nesting, safety."""

import argparse
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from tfmet.backbones import efficientnet_lite
from tfmet.io.torch_checkpoint import (
    UnsafePickleError,
    extract_state_dict,
    load_checkpoint,
    load_state_dict,
)

FORMATS = {"zip": True, "legacy": False}


def test_packaged_legacy_checkpoint_golden_values():
    # The EfficientNet-Lite0 file is in the legacy (pre-1.6) format and its conv weights are
    # stored with HWIO strides (converted from TF), so element order depends on the strides.
    state = load_state_dict(efficientnet_lite.packaged_checkpoint())
    assert len(state) == 296 and sum(v.size for v in state.values()) == 4_694_073
    stem = state["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32
    np.testing.assert_allclose(stem[0, 0, 0, :], [-1.1103361, -1.3087704, -0.01015691], rtol=1e-6)
    np.testing.assert_allclose(stem[0, :, 1, 1], [1.2259164, 1.9868459, 0.2694369], rtol=1e-6)
    np.testing.assert_allclose(stem[5, 2, :, 0], [0.0316122, -0.16491231, -0.03996595], rtol=1e-6)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert state["_bn0.num_batches_tracked"].shape == ()
    np.testing.assert_allclose(
        state["_fc.bias"][:3], [0.03205391, -0.01598576, 0.00529074], rtol=1e-6
    )


torch = pytest.importorskip("torch")


def _rich_checkpoint():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = collections.OrderedDict(
        [
            ("module.transposed", base.t()),  # non-contiguous strides
            ("module.slice", base[1:, 2:]),  # storage offset + strides
            ("module.shared", base),  # same storage as the two above
            ("module.half", base.half()),
            ("module.bf16", base.bfloat16()),
            ("module.double", base.double()[::2]),
            ("module.long", torch.arange(7)),
            ("module.int8", torch.arange(-3, 3, dtype=torch.int8)),
            ("module.bool", torch.tensor([True, False, True])),
            ("module.param", torch.nn.Parameter(torch.full((1,), 3.0))),
            ("module.scalar", torch.tensor(2.5)),
            ("module.empty", torch.zeros(0, 3)),
            ("module.expanded", torch.arange(3.0).expand(4, 3)),  # zero stride
        ]
    )
    return {
        "epoch": 7,
        "state_dict": state,
        "args": argparse.Namespace(net="resnet18", lr=1e-7),
        "val_gap": np.float64(0.25),
        "optimizer": {"state": {0: {"exp_avg": base * 2}}, "param_groups": [{"lr": 1e-3}]},
    }


def _expected(tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_reads_both_formats_like_torch(tmp_path, fmt):
    path = tmp_path / "ckpt.pth"
    saved = _rich_checkpoint()
    torch.save(saved, path, _use_new_zipfile_serialization=FORMATS[fmt])
    assert zipfile.is_zipfile(path) == (fmt == "zip")
    loaded = load_checkpoint(path)
    reference = torch.load(path, weights_only=False)
    for name, tensor in reference["state_dict"].items():
        array = loaded["state_dict"][name]
        expected = _expected(tensor)
        assert array.dtype == expected.dtype, name
        assert array.shape == expected.shape, name
        np.testing.assert_array_equal(array, expected, err_msg=name)
    # bfloat16 widened exactly: the float32 value of each bf16 pattern.
    assert loaded["state_dict"]["module.bf16"].dtype == np.float32
    assert loaded["epoch"] == 7 and loaded["val_gap"] == 0.25
    assert loaded["args"].net == "resnet18" and loaded["args"].lr == 1e-7
    np.testing.assert_array_equal(
        loaded["optimizer"]["state"][0]["exp_avg"], reference["optimizer"]["state"][0]["exp_avg"]
    )
    assert loaded["optimizer"]["param_groups"] == [{"lr": 1e-3}]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_state_dict_extraction(tmp_path, fmt):
    path = tmp_path / "ckpt.pth"
    torch.save(_rich_checkpoint(), path, _use_new_zipfile_serialization=FORMATS[fmt])
    state = load_state_dict(path)
    assert "transposed" in state and not any(k.startswith("module.") for k in state)
    np.testing.assert_array_equal(state["scalar"], np.float32(2.5))
    # `model` nesting and an explicit key.
    wrapped = {"model": {"conv.weight": np.ones((2, 1, 1, 1), np.float32)}, "epoch": 1}
    assert list(extract_state_dict(wrapped)) == ["conv.weight"]
    assert list(extract_state_dict({"a": wrapped}, key="a/model")) == ["conv.weight"]
    with pytest.raises(ValueError, match="no entry 'b'"):
        extract_state_dict(wrapped, key="b")
    with pytest.raises(ValueError, match="no tensors"):
        extract_state_dict({"epoch": 1, "name": "x"})


class _Payload:
    """Pickles into a call of os.system: what a booby-trapped checkpoint contains."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_malicious_checkpoint_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=FORMATS[fmt])
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        load_checkpoint(path)
    assert not marker.exists()
    # The file really is dangerous: torch's unrestricted loader runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth: neither a zip archive nor a pickle"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="plain.pkl: not a PyTorch checkpoint"):
        load_checkpoint(plain)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(100.0)}, legacy, _use_new_zipfile_serialization=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(legacy.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated.pth: truncated inside storage"):
        load_checkpoint(truncated)
    archive = tmp_path / "archive.pth"
    torch.save({"w": torch.arange(4.0)}, archive)
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if "/data/" not in item.filename:
                dst.writestr(item, src.read(item))
    with pytest.raises(ValueError, match="broken.pth: storage record .* is missing"):
        load_checkpoint(broken)
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_checkpoint(scripted)
