"""tfmet-demo's precision and model flags: an unknown precision is refused before the benchmark
is written; the model flags are tfmet-extract's (cli/model_flags.py) with the demo's defaults."""

import os

import pytest

from tests.kit.cli import run_cli
from tfmet.demo.run import run_demo


def test_unknown_precision_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "demo"
    with pytest.raises(ValueError, match=r"`precision` must be one of .*Received: 'fp8'"):
        run_demo(workdir, weights="random", precision="fp8", log=lambda message: None)
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_cli_refuses_an_unknown_precision_and_the_model_flags_it_does_not_use(tmp_path):
    workdir = tmp_path / "demo"
    for flag, message in (
        ("--precision=fp8", "--precision must be one of float32, bfloat16, float16. "),
        ("--model=a.keras", "--model: tfmet-demo builds its model from --backbone and --weights"),
    ):
        result = run_cli("demo", f"--workdir={workdir}", flag)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"tfmet-demo: error: {message}" + ("Received: 'fp8'" if "fp8" in flag else "")
        ]
    assert not os.path.exists(workdir)
    shown = run_cli("demo", "--help").stdout
    assert "(tfmet.cli.model_flags):" in shown
    assert "(tfmet.backbones.names()). (default: efficientnet_lite0)" in shown
    assert "(default: imagenet)" in shown
