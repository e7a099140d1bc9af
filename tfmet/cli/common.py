"""What every tfmet program shares: one UsageError, one way to fail, one way to run `main`.

The flag idiom of every program: flags are defined at module top with `flags.DEFINE_*` and read
through the module's `FLAGS`; required flags are checked with `require` (one error line naming
them), not with absl's `mark_flags_as_required` (which prints the whole usage text).

Bad input leaves a program as one line on stderr, `<program>: error: <message>`, and exit status
2: a `UsageError` raised by the program, or a bad-input error raised by the library (`BAD_INPUT`).
Everything else is a bug or a failure at run time and keeps its traceback (exit status 1).
"""

import sys

from absl import app

from tfmet.io.safe_pickle import UnsafePickleError

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input: the message is one line naming the flag or file."""


# The library's errors for bad input: each names the file or parameter and the problem.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, UnsafePickleError)


def fail(program, message):
    """Bad input: one line `<program>: error: <message>` on stderr, exit status 2."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def require(values, *names):
    """Raises UsageError naming every flag in `names` whose value in `values` is unset."""
    missing = [f"--{name}" for name in names if values.get(name) in (None, "")]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")


def no_arguments(argv):
    """Raises UsageError when positional arguments follow the program name."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def guarded(program, main):
    """`main` with bad input (UsageError, `BAD_INPUT`) turned into `fail(program, ...)`."""

    def wrapped(argv):
        try:
            return main(argv)
        except BAD_INPUT as e:
            fail(program, e)

    return wrapped


def run_program(program, main):
    """`app.run` of `guarded(program, main)`: the console-script entry point of a program."""
    app.run(guarded(program, main))
