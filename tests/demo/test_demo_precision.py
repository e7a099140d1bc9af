"""tfmet-demo's precision: an unknown one is refused before the benchmark is written."""

import os

import pytest

from tfmet.demo.run import run_demo


def test_unknown_precision_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "demo"
    with pytest.raises(ValueError, match=r"`precision` must be one of .*Received: 'fp8'"):
        run_demo(workdir, weights="random", precision="fp8", log=lambda message: None)
    assert not os.path.exists(workdir)
