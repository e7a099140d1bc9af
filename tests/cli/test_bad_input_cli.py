"""Careless and hostile input against the programs (issue #14): every case ends as one line on
stderr naming the file or flag and the problem, with exit status 2 (bad input) or 1 (failure
at run time), and leaves nothing behind that would block the corrected command.

Each case runs the program in a subprocess as a user would, with TensorFlow unimportable unless
the case needs it (`run(..., tensorflow=True)`: a model file to load, or tfmet-export's k/tau
checks): the others are refused before TensorFlow loads.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.kit.cli import ENV, REPO
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store

pytestmark = pytest.mark.slow  # every test runs a program in a subprocess

STYLE_CONFIG = os.path.join(REPO, "configs", "pandora18k.py")


# `python -c NO_TENSORFLOW tfmet.cli.<module> args`: the program with TensorFlow and Keras
# unimportable (an import of either raises ImportError), so a refusal that reaches them ends in
# exit 1 with a traceback, not in the expected one line with exit 2.
NO_TENSORFLOW = (
    "import runpy, sys\n"
    "sys.modules.update(tensorflow=None, keras=None)\n"
    "del sys.argv[0]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def run(module, *args, cwd=REPO, tensorflow=False):
    """The program in a subprocess, with TensorFlow unimportable unless `tensorflow`."""
    start = ["-m"] if tensorflow else ["-c", NO_TENSORFLOW]
    return subprocess.run(
        [sys.executable, *start, f"tfmet.cli.{module}", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(result, status=2):
    """The program's single stderr line (asserting the exit status and that it is alone)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert ": error: " in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"), num_exhibits=3, met_queries=2)


@pytest.fixture(scope="module")
def stores(tree, tmp_path_factory):
    """Descriptor stores of the tree (random unit rows), recording paths and labels."""
    from tfmet.data import met

    directory = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        gt = met.load_split(tree.info_dir, split)
        rows = rng.normal(size=(len(gt), 8)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store.write_store(
            directory, split, rows, paths=gt.paths, labels=gt.labels.tolist(), backbone="x"
        )
    return directory


def copy_info(tree, directory, **replace):
    """A copy of the tree's ground truth with some files' content replaced (text)."""
    os.makedirs(directory)
    for name in os.listdir(tree.info_dir):
        with open(os.path.join(tree.info_dir, name)) as f:
            text = f.read()
        with open(os.path.join(directory, name), "w") as f:
            f.write(replace.get(name, text))
    return directory


# --- Config files -------------------------------------------------------------------------------

CONFIG_FILES = {
    "raising.py": ('raise RuntimeError("boom")\n', "loading the config failed: RuntimeError: boom"),
    "syntax.py": ("def get_config(:\n", "syntax error in"),
    "no_get.py": ("x = 1\n", "defines no get_config()"),
    "none.py": ("def get_config():\n    return None\n", "get_config() returned None"),
    "typo.py": (
        "from tfmet.training.configs import style_config\n\n"
        "def get_config():\n    c = style_config()\n    c.train.epoks = 3\n    return c\n",
        "has no entry `train.epoks` (did you mean `train.epochs`?)",
    ),
    "negative_lr.py": (
        "from tfmet.training.configs import style_config\n\n"
        "def get_config():\n    c = style_config()\n    c.dataset.root = '.'\n"
        "    c.train.learning_rate = -0.1\n    return c\n",
        "`train.learning_rate` must be a positive number. Received: -0.1",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_files_that_do_not_load_or_validate(tmp_path, name):
    text, message = CONFIG_FILES[name]
    config = tmp_path / name
    config.write_text(text)
    line = one_line(run("train_style", f"--config={config}", f"--workdir={tmp_path / 'w'}"))
    assert message in line
    assert not os.path.exists(tmp_path / "w" / "config.json")  # nothing blocks the retry


@pytest.mark.parametrize(
    "args, message",
    [
        ([f"--config={STYLE_CONFIG}:nosuch"], "Unknown pandora18k config variant 'nosuch'"),
        ([f"--config={STYLE_CONFIG}", "--config.train.epoks=3"], "--config.train.epoks: the"),
        ([f"--config={STYLE_CONFIG}", "--config.train.epochs=abc"], "--config.train.epochs=abc"),
        (["--config=/nonexistent/c.py"], "No such file or directory"),
    ],
)
def test_config_flags(tmp_path, args, message):
    line = one_line(run("train_style", *args, f"--workdir={tmp_path / 'w'}"))
    assert message in line


def test_contrastive_config_override_of_an_unknown_key(tree, tmp_path):
    line = one_line(
        run(
            "train_contrastive",
            f"--config={os.path.join(REPO, 'configs', 'met_contrastive_r18.py')}",
            "--config.epoks=3",
            f"--info_dir={tree.info_dir}",
            f"--image_root={tree.image_root}",
            f"--workdir={tmp_path / 'w'}",
        )
    )
    assert "--config.epoks: the config has no key 'epoks'" in line


# Every program that takes --config, and config files that cannot serve as one (issue #27): each
# is one line naming the file, exit status 2, in every program.
CONFIG_PROGRAMS = ("demo", "export", "extract", "predict", "train_contrastive", "train_style")

BROKEN_CONFIGS = {
    "syntax.py": ("def get_config(:\n", "syntax error in {file} line 1: invalid syntax"),
    "raising.py": ('raise RuntimeError("boom")\n', "loading the config failed: RuntimeError: boom"),
    "get_raises.py": (
        'def get_config():\n    raise KeyError("k")\n',
        "loading the config failed: KeyError: 'k'",
    ),
    "int.py": ("def get_config():\n    return 1\n", "get_config() returned int, not a ConfigDict"),
    "dict.py": (
        'def get_config():\n    return {"a": 1}\n',
        "get_config() returned dict, not a ConfigDict",
    ),
    "none.py": ("def get_config():\n    return None\n", "get_config() returned None, not a config"),
    "no_get.py": ("x = 1\n", "the config file defines no get_config()"),
    "null_bytes.py": ("x = 1\0\n", "syntax error: source code string cannot contain null bytes"),
    "missing.py": (None, "cannot load the config file ([Errno 2] No such file or directory"),
}


def test_every_program_taking_config_is_covered():
    cli = os.path.join(REPO, "tfmet", "cli")
    defining = sorted(
        name[:-3]
        for name in os.listdir(cli)
        if name.endswith(".py")
        and "DEFINE_config_file(" in open(os.path.join(cli, name), encoding="utf-8").read()
    )
    assert defining == list(CONFIG_PROGRAMS)


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
@pytest.mark.parametrize("program", CONFIG_PROGRAMS)
def test_broken_config_files_in_every_program(tmp_path, program, name):
    text, message = BROKEN_CONFIGS[name]
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    line = one_line(run(program, f"--config={config}"))
    assert line.startswith(f"tfmet-{program.replace('_', '-')}: error: --config={config}: ")
    assert message.format(file=config) in line


# --- Output paths that cannot be written ----------------------------------------------------------


def test_output_paths_that_are_files_or_folders(tree, stores, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ("export", ["--kind=descriptor", "--backbone=resnet_tiny", f"--out={a_file}"], "--out="),
        (
            "extract",
            [f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}", "--backbone=x"]
            + [f"--output_dir={a_file}"],
            "--output_dir=",
        ),
        (
            "knn_eval",
            [stores, f"--info_dir={tree.info_dir}", "-k", 1, "-t", 1, "--raw"]
            + [f"--results_json={tmp_path}"],
            "--results_json=",
        ),
        (
            "import_descriptors",
            [f"--descriptors={a_file}", f"--output_dir={a_file / 'sub'}"],
            "is a file, not a folder",
        ),
        ("train_style", [f"--config={STYLE_CONFIG}", f"--workdir={a_file}"], "--workdir="),
        ("evaluate_style", [f"--workdir={tmp_path}", f"--output_dir={a_file}"], "--output_dir="),
    ]
    for module, args, message in cases:
        line = one_line(run(module, *args))
        assert message in line and str(a_file if "results" not in message else tmp_path) in line
    # nothing was computed and lost: the knn-eval outputs do not exist
    assert not any(name.startswith("knn_") for name in os.listdir(stores))


def test_a_ground_truth_file_that_is_a_folder(tree, stores, tmp_path):
    info = copy_info(tree, tmp_path / "info")
    os.remove(info / "valset.json")
    os.mkdir(info / "valset.json")
    line = one_line(run("knn_eval", stores, f"--info_dir={info}", "-k", 1, "-t", 1, "--raw"))
    assert "valset.json" in line


# --- Files whose content is hostile or broken ---------------------------------------------------


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _HugeArray:
    def __reduce__(self):
        return (np.ndarray, ((2**20, 2**20), np.dtype("f8")))


def test_pickles_that_would_run_code_or_allocate_terabytes(tree, tmp_path):
    evil = tmp_path / "evil" / "descriptors.pkl"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({"train_descriptors": _System()}))
    for module, args in (
        ("knn_eval", [evil.parent, f"--info_dir={tree.info_dir}", "-k", 1, "-t", 1, "--raw"]),
        ("import_descriptors", [f"--descriptors={evil}", f"--output_dir={tmp_path / 'o'}"]),
    ):
        result = run(module, *args)
        line = one_line(result)
        assert "refusing to load global 'posix.system'" in line and "pwned" not in result.stdout
    huge = tmp_path / "huge.pkl"
    huge.write_bytes(pickle.dumps({"train_descriptors": _HugeArray()}, protocol=2))
    line = one_line(run("import_descriptors", f"--descriptors={huge}", f"--output_dir={tmp_path}"))
    assert "declares an array of shape (1048576, 1048576)" in line and "huge.pkl" in line


def test_ground_truth_and_stores_with_absurd_content(tree, stores, tmp_path):
    args = ["-k", 1, "-t", 1, "--raw"]
    valset = json.loads(open(os.path.join(tree.info_dir, "valset.json")).read())
    first = next(e for e in valset if "MET_id" in e)
    first["MET_id"] = 2**70
    info = copy_info(tree, tmp_path / "big_id", **{"valset.json": json.dumps(valset)})
    line = one_line(run("knn_eval", stores, f"--info_dir={info}", *args))
    assert "valset.json: entry" in line and str(2**70) in line

    info = copy_info(tree, tmp_path / "deep", **{"testset.json": "[" * 200_000 + "]" * 200_000})
    line = one_line(run("knn_eval", stores, f"--info_dir={info}", *args))
    assert "testset.json" in line and ("nested too deeply" in line or "not valid JSON" in line)

    empty = tmp_path / "empty_npy"
    for split in ("train", "val", "test"):
        for path in (store.array_path(stores, split), store.manifest_path(stores, split)):
            os.makedirs(empty, exist_ok=True)
            with open(path, "rb") as f, open(empty / os.path.basename(path), "wb") as g:
                g.write(f.read())
    open(store.array_path(empty, "val"), "wb").close()
    line = one_line(run("knn_eval", empty, f"--info_dir={tree.info_dir}", *args))
    assert "val_descriptors.npy: not a readable .npy array" in line

    lying = tmp_path / "lying.npy"
    with open(lying, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 512)}
        )
    os.replace(lying, store.array_path(empty, "val"))
    line = one_line(run("knn_eval", empty, f"--info_dir={tree.info_dir}", *args))
    assert "declares (1000000000, 512)" in line


def test_model_files_that_do_not_load(tree, tmp_path):
    unregistered = tmp_path / "model.keras"
    with zipfile.ZipFile(unregistered, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        z.writestr(
            "config.json",
            json.dumps(
                {"module": "nowhere", "class_name": "NoSuch", "config": {"x": "y" * 50_000}}
            ),
        )
        z.writestr("model.weights.h5", b"")
    line = one_line(
        run(
            "extract",
            f"--info_dir={tree.info_dir}",
            f"--image_root={tree.image_root}",
            f"--output_dir={tmp_path / 'o'}",
            f"--model={unregistered}",
            tensorflow=True,  # Keras reads the file
        )
    )
    assert "model.keras: not a loadable tfmet Embedder" in line and len(line) < 600

    export = tmp_path / "export"
    (export / "assets").mkdir(parents=True)
    (export / "assets" / "tfmet_metadata.json").write_text(
        json.dumps({"kind": "style", "class_names": {"style": ["a"]}, "image_size": 32})
    )
    (export / "saved_model.pb").write_bytes(b"\x08\x01\x12")  # a truncated protobuf
    image = tree.image_paths("val")[0] if hasattr(tree, "image_paths") else None
    image = image or os.path.join(tree.image_root, "images", tree.val[0]["path"])
    line = one_line(run("predict", f"--model={export}", image, tensorflow=True))
    assert "not a loadable SavedModel" in line


# --- Values that make no sense --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind=recognizer", "--k=3", "--tau=1"], "needs --descriptor_dir and --info_dir"),
        (["--kind=recognizer", "--descriptor_dir=d", "--info_dir=i"], "needs --k and --tau, or"),
        (["--kind=recognizer", "--descriptor_dir=d", "--info_dir=i", "--k=3"], "--k and --tau"),
        (["--kind=style"], "the style export needs --style_model"),
    ],
)
def test_export_inputs_missing_for_the_kind(tmp_path, args, message):
    line = one_line(run("export", "--backbone=resnet_tiny", *args, f"--out={tmp_path / 'e'}"))
    assert message in line
    assert not os.path.exists(tmp_path / "e")


def test_values_that_make_no_sense(tree, stores, tmp_path):
    base = [f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}", "--backbone=x"]
    out = tmp_path / "extract"
    line = one_line(run("extract", *base, f"--output_dir={out}", "--max_side=0"))
    assert "--max_side must be a positive integer. Received: 0" in line
    assert not os.path.exists(out)  # not recorded in a run.json that would block the fix
    line = one_line(
        run("extract", *base, f"--output_dir={out}", "--queries_only", "--splits=train")
    )
    assert "--queries_only leaves out train" in line

    line = one_line(
        run(
            "export",
            "--kind=recognizer",
            "--backbone=resnet_tiny",
            f"--descriptor_dir={stores}",
            f"--info_dir={tree.info_dir}",
            "--k=3",
            "--tau=-5",
            "--raw",
            f"--out={tmp_path / 'recognizer'}",
            tensorflow=True,  # k and tau are checked by tfmet.export.builders
        )
    )
    assert "`tau` must be a finite number >= 0. Received: tau=-5.0" in line
    assert not os.path.exists(tmp_path / "recognizer")
