"""One way for every program to fail on bad input: one line, exit status 2; and how they exit."""

import sys

import pytest

from tests.kit.cli import run_command
from tfmet.cli.common import RunFailure, UsageError, guarded, no_arguments, require
from tfmet.io.safe_pickle import UnsafePickleError


@pytest.mark.parametrize(
    "error",
    [
        UsageError("--k is required"),
        ValueError("x.json: not valid JSON"),
        FileNotFoundError("x.npy: not found"),
        UnsafePickleError("x.pkl: refusing to load global 'os.system'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, error):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        guarded("tfmet-x", main)(["tfmet-x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"tfmet-x: error: {error}\n"


@pytest.mark.parametrize(
    "error, status, line",
    [
        (OSError(28, "No space left on device", "/out/x.npy"), 1, "/out/x.npy: No space left"),
        (IsADirectoryError(21, "Is a directory", "/out/r.json"), 2, "/out/r.json: Is a directory"),
        (PermissionError(13, "Permission denied", "/ro/x"), 2, "/ro/x: Permission denied"),
        (RunFailure("the model gave non-finite descriptors"), 1, "the model gave non-finite"),
    ],
)
def test_os_errors_and_run_failures_are_one_line(capsys, error, status, line):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        guarded("tfmet-x", main)(["tfmet-x"])
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("tfmet-x: error: ") and line in err and err.count("\n") == 1


def test_tfmet_traceback_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("TFMET_TRACEBACK", "1")

    def main(argv):
        raise ValueError("x.json: not valid JSON")

    with pytest.raises(ValueError, match="not valid JSON"):
        guarded("tfmet-x", main)(["tfmet-x"])


def test_other_errors_keep_their_traceback():
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        guarded("tfmet-x", main)(["tfmet-x"])


def test_main_return_value_is_kept():
    assert guarded("tfmet-x", lambda argv: 3)(["tfmet-x"]) == 3


def test_require_names_every_missing_flag():
    require({"a": 1, "b": "x"}, "a", "b")
    with pytest.raises(UsageError, match="^missing --b, --c$"):
        require({"a": 1, "b": "", "c": None}, "a", "b", "c")


def test_no_arguments():
    no_arguments(["prog"])
    with pytest.raises(UsageError, match="unexpected arguments: x y"):
        no_arguments(["prog", "x", "y"])


# A program (run_program) whose main leaves cyclic garbage with a finalizer, then exits 3.
EXITING_PROGRAM = """
import gc, sys
from tfmet.cli.common import run_program

class Cycle:
    def __del__(self):
        open(sys.argv[1] + ".finalized", "w").close()

def main(argv):
    cycle = Cycle()
    cycle.itself = cycle  # garbage only the cyclic collector frees, once main returns
    return 3

try:
    run_program("tfmet-x", main)
finally:
    print("frozen objects:", gc.get_freeze_count(), flush=True)
"""


@pytest.mark.slow  # a subprocess
def test_a_program_collects_its_garbage_then_freezes_what_is_left_for_exit(tmp_path):
    done = run_command([sys.executable, "-c", EXITING_PROGRAM, str(tmp_path / "x")])
    assert done.returncode == 3, done.stderr  # main's status is the exit status
    assert (tmp_path / "x.finalized").exists()  # collected (finalizer run) before the freeze
    frozen = int(done.stdout.split("frozen objects:")[1])
    assert frozen > 1000  # the shutdown's collections skip them (tools/bench_exit.py)
