"""Running tfmet's programs in subprocesses, as a user would."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def run_cli(module, *args, cwd=REPO, timeout=600, env=None):
    """`python -m tfmet.cli.<module> *args` in a subprocess; returns the CompletedProcess.

    TensorFlow's C++ start-up logs are silenced (TF_CPP_MIN_LOG_LEVEL=3), stdout and stderr are
    captured as text, and the program runs from the repository root unless `cwd` says otherwise.
    `env` adds variables to (or overrides) the test process's environment.
    """
    return run_command(
        [sys.executable, "-m", f"tfmet.cli.{module}", *map(str, args)],
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def run_command(command, cwd=REPO, timeout=600, env=None):
    """`command` (a list) in a subprocess with the same conventions as `run_cli`."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=dict(ENV, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def extract_command(tree, out, *flags):
    """tfmet-extract of a `tests.kit.met_tree` tree into `out` with the tiny ResNet (a list)."""
    return [
        sys.executable,
        "-m",
        "tfmet.cli.extract",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        f"--output_dir={out}",
        "--backbone=resnet_tiny",
        "--noprogress",
        *flags,
    ]


def strace(syscall, inject=None):
    """The strace prefix (a list) that traces `syscall` in a program and its children, with the
    fault `inject` (e.g. "error=ENOSPC") on it.

    --seccomp-bpf stops the program only at `syscall`; strace otherwise stops at every system
    call, and TensorFlow's import takes 15-19 s instead of ~5 s. strace 6.1 (Debian 12) does not
    deliver an injected signal under --seccomp-bpf, so kills go through `tests.kit.rename_kill`.
    """
    if inject is not None and "signal=" in inject:
        raise ValueError(f"strace cannot inject {inject!r} here: use tests.kit.rename_kill")
    prefix = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "-e", f"trace={syscall}"]
    return prefix + (["-e", f"inject={syscall}:{inject}"] if inject else [])
