"""replace_directory: a kill at any instant leaves the old set or the new one."""

import os

from tfmet.io.atomic import ASIDE, recover_directory, replace_directory


def _tree(path, text):
    os.makedirs(path)
    with open(os.path.join(path, "a.txt"), "w") as f:
        f.write(text)
    return str(path)


def _read(path):
    with open(os.path.join(path, "a.txt")) as f:
        return f.read()


def test_replace_directory_swaps_and_leaves_nothing_aside(tmp_path):
    target = _tree(tmp_path / "out", "old")
    replace_directory(_tree(tmp_path / "new", "new"), target)
    assert _read(target) == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_directory_into_a_missing_target(tmp_path):
    target = str(tmp_path / "out")
    replace_directory(_tree(tmp_path / "new", "new"), target)
    assert _read(target) == "new"


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    # The state a kill after the first rename leaves: the old set aside, no target.
    target = str(tmp_path / "out")
    _tree(tmp_path / f"out{ASIDE}abc123", "old")
    recover_directory(target)
    assert _read(target) == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_aside_copies_next_to_a_target_are_removed(tmp_path):
    target = _tree(tmp_path / "out", "current")
    _tree(tmp_path / f"out{ASIDE}zzz", "stale")
    replace_directory(_tree(tmp_path / "new", "new"), target)
    assert _read(target) == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]
