"""One way for every program to fail on bad input: one line, exit status 2."""

import pytest

from tfmet.cli.common import UsageError, guarded, no_arguments, require
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
