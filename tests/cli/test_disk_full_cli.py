"""A disk that fills up under a real program: exit status 1, one line, the old outputs stand
(docs/reliability.md: status 1 for `ENOSPC`; "the old set or the new one").

strace's fault injection makes every `fsync` fail with ENOSPC, as on a full disk (the write that
reaches the disk is the one that fails; tfmet fsyncs every output before renaming it in)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.kit.cli import ENV, REPO, strace
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)"),
]


def test_knn_eval_on_a_full_disk_is_one_line_exit_1_and_keeps_the_old_results(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=3, met_queries=2)
    from tfmet.data import met

    stores = tmp_path / "stores"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        rows = rng.normal(size=(len(met.load_split(tree.info_dir, split)), 8)).astype(np.float32)
        store.write_store(stores, split, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    out = tmp_path / "knn"
    knn = [sys.executable, "-m", "tfmet.cli.knn_eval", str(stores), f"--info_dir={tree.info_dir}",
           "-t", "1", "--raw", f"--output_dir={out}"]  # fmt: skip

    def run(*command):
        return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    assert run(*knn, "-k", "1").returncode == 0
    before = {
        name: (out / name).read_bytes()
        for name in sorted(os.listdir(out))
        if out.joinpath(name).is_file()
    }
    assert json.loads(before["knn_results.json"])["k"] == 1
    full = strace("fsync", "error=ENOSPC")
    result = run(*full, *knn, "-k", "2")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    # The fsync names no file: the atomic write names the output it was writing.
    assert lines[-1].startswith(f"tfmet-knn-eval: error: {out}") and lines[-1].endswith(
        ": No space left on device"
    ), lines[-3:]
    assert "Traceback" not in result.stderr
    after = {
        name: (out / name).read_bytes()
        for name in sorted(os.listdir(out))
        if out.joinpath(name).is_file()
    }
    assert after == before  # the k=1 set, byte for byte, and no temporary beside it
