"""Atomic files on a full disk, and which temporaries the next start removes (docs/reliability.md,
"Outputs: the old set or the new one")."""

import errno
import json
import os
import subprocess

import numpy as np
import pytest

from tfmet.io import atomic


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["fsync", "write"])
def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "knn_results.json"
    atomic.save_json(target, {"gap": 0.5})
    if failing == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", _full_disk)
    else:
        monkeypatch.setattr(atomic.json, "dump", _full_disk)
    with pytest.raises(OSError) as raised:
        atomic.save_json(target, {"gap": 0.9})
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(target)  # the one-line error names the output
    assert json.loads(target.read_text()) == {"gap": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["knn_results.json"]


def test_a_full_disk_while_saving_an_array_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "fsync", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        atomic.save_npy(tmp_path / "train_descriptors.npy", np.ones((3, 4), np.float32))
    assert os.listdir(tmp_path) == []


def test_only_the_temporaries_of_processes_that_are_gone_are_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # that process has exited and been reaped: its pid is free
    assert not atomic._alive(dead) or pytest.skip(f"pid {dead} was reused")
    mine = f"{atomic.temporary_prefix()}x-knn_results.json"
    gone_file = f".tmp-{dead}-x-knn_results.json"
    gone_folder = f".tmp-{dead}-export-abcd"
    for name in (mine, gone_file, "train_descriptors.npy", ".tmp-notapid-x"):
        (tmp_path / name).write_text("x")
    (tmp_path / gone_folder).mkdir()
    (tmp_path / gone_folder / "saved_model.pb").write_bytes(b"\x08")
    assert atomic.clean_stale_temporaries(tmp_path) == sorted([gone_file, gone_folder])
    assert sorted(os.listdir(tmp_path)) == sorted([mine, "train_descriptors.npy", ".tmp-notapid-x"])
    assert atomic.clean_stale_temporaries(tmp_path / "missing") == []
