"""The import layers of setup.cfg's import-linter contracts: kept today, and able to fail."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.kit import REPO

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint_imports(root):
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [LINT_IMPORTS, "--config", "setup.cfg", "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _lint_imports_with(root, module, line):
    """lint-imports on `root` once `line` (an import) is appended to `tfmet/<module>`."""
    path = root / "tfmet" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")
    return _lint_imports(root)


@pytest.fixture
def tree_copy(tmp_path):
    shutil.copytree(os.path.join(REPO, "tfmet"), tmp_path / "tfmet")
    shutil.copy(os.path.join(REPO, "setup.cfg"), tmp_path / "setup.cfg")
    return tmp_path


@pytest.mark.slow
def test_contracts_are_kept(tree_copy):
    done = _lint_imports(tree_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout
    assert "ignore_imports" not in (tree_copy / "setup.cfg").read_text()  # no exceptions


@pytest.mark.slow
def test_a_backwards_import_breaks_the_layers_contract(tree_copy):
    done = _lint_imports_with(tree_copy, "layers/gem.py", "from tfmet.retrieval import knn")
    assert done.returncode != 0
    assert "tfmet layers" in done.stdout and "BROKEN" in done.stdout
    assert "tfmet.layers.gem -> tfmet.retrieval.knn" in done.stdout


@pytest.mark.slow
def test_a_circle_breaks_the_acyclic_contract(tree_copy):
    # descriptors -> backbones already exists (descriptors import backbones): adding
    # backbones -> descriptors closes a circle.
    done = _lint_imports_with(tree_copy, "backbones/hub.py", "from tfmet.descriptors import spec")
    assert done.returncode != 0
    assert "no import circles between sibling modules BROKEN" in done.stdout.replace("\n", " ")


# The packages a program imports to check its input (docs/architecture.md): they import with
# TensorFlow and Keras unimportable; the packages of models load TensorFlow.
TF_FREE_PACKAGES = ("cli", "data", "demo", "beam", "io", "metrics", "retrieval", "training")
TF_PACKAGES = ("backbones", "descriptors", "export", "layers", "serving")
IMPORT_WITHOUT_TENSORFLOW = (
    "import importlib, sys\n"
    "sys.modules.update(tensorflow=None, keras=None)\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        importlib.import_module('tfmet.' + name)\n"
    "        print(name, 'imported')\n"
    "    except ImportError as e:\n"
    "        print(name, 'needs', e.name)\n"
)


def test_every_package_is_listed_as_tensorflow_free_or_not():
    packages = {
        name
        for name in os.listdir(os.path.join(REPO, "tfmet"))
        if os.path.exists(os.path.join(REPO, "tfmet", name, "__init__.py"))
    }
    assert packages == set(TF_FREE_PACKAGES) | set(TF_PACKAGES)


@pytest.mark.slow  # a subprocess
def test_the_packages_that_programs_check_input_with_load_without_tensorflow():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_TENSORFLOW, *TF_FREE_PACKAGES, *TF_PACKAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[: len(TF_FREE_PACKAGES)] == [f"{name} imported" for name in TF_FREE_PACKAGES]
    for line in lines[len(TF_FREE_PACKAGES) :]:  # the list of TF packages is the whole rest
        assert line.split()[1:] in (["needs", "tensorflow"], ["needs", "keras"]), line
