"""`--help` of every program: what it does, how it is called and its own flags, first; answered
without loading TensorFlow (checked in the process that printed it, not by timing)."""

import configparser
import os
import sys

import pytest

from tests.kit.cli import REPO, run_command

pytestmark = pytest.mark.slow  # a fresh interpreter per program: TensorFlow must not be loaded


def _programs():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return [tuple(p.strip() for p in line.split("=")) for line in lines]


PROGRAMS = _programs()

# One flag each program defines itself, and what its usage names as positional arguments.
OWN = {
    "tfmet-extract": ("--output_dir", None),
    "tfmet-import-descriptors": ("--output_dir", None),
    "tfmet-knn-eval": ("--info_dir", "DESCRIPTOR_DIR"),
    "tfmet-train-contrastive": ("--info_dir", None),
    "tfmet-train-style": ("--config", None),
    "tfmet-evaluate-style": ("--workdir", None),
    "tfmet-predict": ("--model", "image1.jpg"),
    "tfmet-export": ("--kind", None),
    "tfmet-convert-weights": ("--from", None),
    "tfmet-demo": ("--workdir", None),
    "tfmet-extract-beam": ("--beam_runner", None),
    "tfmet-recognize": ("--model", "photo.jpg"),
    "tfmet-serve": ("--model", None),
    "tfmet-collection": ("--export", "list"),
}

_SCRIPT = """
import sys
from {module} import {function} as run
sys.argv = [{program!r}, *sys.argv[1:]]
try:
    run()
except SystemExit as e:
    code = e.code
assert "tensorflow" not in sys.modules, "TensorFlow loaded"
assert "keras" not in sys.modules, "Keras loaded"
sys.exit(code)
"""


def _help(program, entry, *args):
    module, function = entry.split(":")
    script = _SCRIPT.format(module=module, function=function, program=program)
    return run_command([sys.executable, "-c", script, *args], timeout=120)


def test_every_program_has_a_case():
    assert sorted(OWN) == sorted(p for p, _ in PROGRAMS)


@pytest.mark.parametrize(("program", "entry"), PROGRAMS, ids=[p for p, _ in PROGRAMS])
def test_help_says_what_the_program_does_and_its_flags(program, entry):
    done = _help(program, entry, "--help")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[:30]
    assert first[0].startswith(f"{program}: "), first[0]
    flag, positional = OWN[program]
    assert any(line.startswith(f"  {flag}  ") for line in first), first
    if positional:
        assert any(positional in line for line in first), first
    assert f"`{program} --helpfull` also lists absl's flags" in done.stdout
    assert "--verbosity" not in done.stdout  # absl's flags: only with --helpfull
    assert done.stderr == ""


@pytest.mark.parametrize("program", ["tfmet-knn-eval", "tfmet-recognize"])
def test_h_is_help_and_helpfull_puts_the_own_flags_first(program):
    entry = dict(PROGRAMS)[program]
    short = _help(program, entry, "-h")
    assert short.returncode == 0, short.stderr
    assert short.stdout == _help(program, entry, "--help").stdout
    full = _help(program, entry, "--helpfull")
    assert full.returncode == 0, full.stderr
    assert full.stdout.startswith(short.stdout.rsplit("\n\n", 1)[0])
    assert "Flags of absl.logging:" in full.stdout and "--verbosity" in full.stdout


def test_knn_eval_help_lists_short_and_single_letter_flags():
    done = _help("tfmet-knn-eval", dict(PROGRAMS)["tfmet-knn-eval"], "--help")
    lines = done.stdout.splitlines()
    assert "  -d, --dim  Dimension after PCA-whitening. (default: 512)" in lines
    assert "  -k  Neighbours; with --autotune, restricts the grid to this k." in lines
    assert (
        "  --backend  <exact|scann>: Search: exact brute force or ScaNN approximate. "
        "(default: exact)" in lines
    )
    autotune = "  --[no]autotune  Choose k and tau by val GAP over the reference's grid."
    assert f"{autotune} (default: false)" in lines
