"""The one resume rule both trainings use, and what they share about a run directory."""

import json

import ml_collections
import pytest

from tfmet.io.progress import format_seconds
from tfmet.training import rundir


def test_config_record_is_json_as_read_back():
    config = ml_collections.ConfigDict({"a": (1, 2), "train": {"epochs": 3}})
    assert rundir.config_record(config) == {"a": [1, 2], "train": {"epochs": 3}}


def test_flatten_uses_dotted_paths():
    assert rundir.flatten({"a": 1, "train": {"epochs": 3, "opt": {"lr": 0.1}}}) == {
        "a": 1,
        "train.epochs": 3,
        "train.opt.lr": 0.1,
    }


def test_resume_differences_ignore_only_the_resumable_entries():
    old = {"batch_size": 4, "epochs": 2, "train": {"patience": 1, "seed": 0}}
    new = {"batch_size": 8, "epochs": 5, "train": {"patience": 9, "seed": 1}, "extra": True}
    resumable = {"epochs", "train.patience"}
    assert rundir.resume_differences(old, new, resumable) == ["batch_size", "extra", "train.seed"]
    assert rundir.resume_differences(old, old | {"epochs": 7}, resumable) == []


def test_check_resume_refuses_with_the_file_and_every_difference(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"batch_size": 4, "epochs": 2}))
    rundir.check_resume(str(path), {"batch_size": 4, "epochs": 10}, {"epochs"})  # resumable
    with pytest.raises(ValueError) as e:
        rundir.check_resume(str(path), {"batch_size": 8, "epochs": 2}, {"epochs"})
    message = str(e.value)
    assert message.startswith(f"{path}: cannot resume with a different setup")
    assert "batch_size: 4 recorded, 8 now" in message and "only epochs may change" in message


def test_check_resume_without_a_record_accepts(tmp_path):
    rundir.check_resume(str(tmp_path / "missing.json"), {"a": 1}, set())


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0:00:00"),
        (59.9, "0:00:59"),
        (3661, "1:01:01"),
        (float("inf"), "?"),
        (float("nan"), "?"),
    ],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
