"""tools/gpu_check.sh where there is no GPU: "no GPU", exit 0, before any test or benchmark.

Not marked `gpu`: these run everywhere. `nvidia-smi` is a stand-in put first on PATH, so that
the outcome does not depend on the machine.
"""

import os
import subprocess
import sys

import pytest

from tests.kit import REPO


def gpu_check(tmp_path, nvidia_smi, **env):
    """Runs the script with a fake `nvidia-smi` (a shell body) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
    fake.chmod(0o755)
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(
        ["bash", os.path.join(REPO, "tools", "gpu_check.sh")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_gpu_listed_by_nvidia_smi_is_no_gpu_and_success(tmp_path):
    result = gpu_check(tmp_path, "exit 9")  # as when the driver finds no device
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("no GPU"), result.stdout
    assert "tests marked gpu" not in result.stdout


def test_require_gpu_turns_no_gpu_into_a_failure(tmp_path):
    result = gpu_check(tmp_path, "exit 9", REQUIRE_GPU="1")
    assert result.returncode == 1
    assert result.stdout.startswith("no GPU"), result.stdout


@pytest.mark.slow
def test_a_gpu_tensorflow_cannot_see_is_no_gpu_with_a_warning(tmp_path):
    # nvidia-smi lists one, but TensorFlow is shown none (as without its CUDA libraries).
    result = gpu_check(
        tmp_path,
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"',
        PYTHON=sys.executable,
        CUDA_VISIBLE_DEVICES="-1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "nvidia-smi: GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
    assert lines[1].startswith(f"python: {sys.executable} (PYTHON={sys.executable}): Python 3.")
    assert "TensorFlow 2." in lines[1]
    assert any(line.startswith("WARNING: nvidia-smi lists a GPU") for line in lines)
    assert lines[-1] == "no GPU: TensorFlow lists none"
