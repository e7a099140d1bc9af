"""Programs run with their `rename` calls numbered, listed, or killed at (tests/kit/rename_kill.c).

The kill-at-every-write tests stop a program by SIGKILL as its Nth rename starts. The C library
beside this module does it from inside the program (LD_PRELOAD), at native speed; strace's
signal injection needs full ptrace, under which TensorFlow's import takes 15-19 s instead of
~5 s. The library is built once per test process with the system's C compiler.
"""

import atexit
import functools
import os
import shutil
import subprocess
import tempfile

from tests.kit.cli import run_command

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rename_kill.c")
COMPILER = shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library():
    """The path of the built library (in a temporary folder removed when the process exits)."""
    if COMPILER is None:
        raise RuntimeError("no C compiler (cc, gcc) to build tests/kit/rename_kill.c")
    directory = tempfile.mkdtemp(prefix="tfmet-rename-kill-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = os.path.join(directory, "librename_kill.so")
    built = subprocess.run(
        [COMPILER, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", path, SOURCE, "-ldl"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building {SOURCE} failed:\n{built.stderr}")
    return path


def run_renames(command, kill_at=None, listing=None, timeout=600):
    """Runs `command` (a list, as `tests.kit.cli.run_command` does) with its renames, and those
    of its children, numbered from 1: killed by SIGKILL as rename number `kill_at` starts, and
    each written to the file `listing` as a line `rename("old", "new")`, in order."""
    with tempfile.TemporaryDirectory(prefix="tfmet-renames-") as scratch:
        env = {
            "LD_PRELOAD": " ".join(filter(None, [library(), os.environ.get("LD_PRELOAD")])),
            "TFMET_RENAME_COUNTER": os.path.join(scratch, "count"),
        }
        if kill_at is not None:
            env["TFMET_RENAME_KILL_AT"] = str(kill_at)
        if listing is not None:
            env["TFMET_RENAME_LOG"] = str(listing)
        return run_command(command, timeout=timeout, env=env)
