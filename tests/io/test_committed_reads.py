"""Readers see a committed output set even before a kill's roll-forward has run."""

import json

import pytest

from tfmet.io import atomic
from tfmet.io.json_files import read_json


def _write(path, value):
    path.write_text(json.dumps(value))
    return path


def _killed_after_commit(monkeypatch, directory, moves):
    """commit_files as a kill right after its commit point leaves it: the journal, no moves."""
    monkeypatch.setattr(atomic, "_roll_forward", lambda directory, journal: None)
    atomic.commit_files(directory, "results", moves)
    monkeypatch.undo()


def test_a_committed_set_is_read_before_and_after_its_roll_forward(tmp_path, monkeypatch):
    results = _write(tmp_path / "results.json", {"k": 1})
    old_curve = _write(tmp_path / "curve.json", {"old": True})
    first = tmp_path / "first.json"  # not in the old set at all
    moves = [
        (_write(tmp_path / ".tmp-1-results.json", {"k": 5}), results),
        (_write(tmp_path / ".tmp-1-first.json", [1, 2]), first),
        (None, old_curve),  # the new set has no curve
    ]
    _killed_after_commit(monkeypatch, tmp_path, moves)
    assert json.loads(results.read_text()) == {"k": 1}  # on disk: still the old file
    assert read_json(results) == {"k": 5}
    assert read_json(first) == [1, 2]
    with pytest.raises(FileNotFoundError, match="curve.json: removed by a committed output set"):
        read_json(old_curve)
    assert atomic.committed_path(tmp_path / "other.json") == str(tmp_path / "other.json")

    assert atomic.recover_commits(tmp_path) == ["results"]
    assert read_json(results) == {"k": 5} and read_json(first) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "results.json"]
    with pytest.raises(FileNotFoundError, match="curve.json: JSON file not found"):
        read_json(old_curve)


def test_a_set_rolled_forward_between_lookup_and_open_is_read_in_place(tmp_path, monkeypatch):
    results = _write(tmp_path / "results.json", {"k": 1})
    moves = [(_write(tmp_path / ".tmp-2-results.json", {"k": 7}), results)]
    _killed_after_commit(monkeypatch, tmp_path, moves)
    looked_up = atomic.committed_path(results)
    monkeypatch.setattr("tfmet.io.json_files.committed_path", lambda path: looked_up)
    atomic.recover_commits(tmp_path)  # the writer's restart moves it meanwhile
    assert read_json(results) == {"k": 7}
