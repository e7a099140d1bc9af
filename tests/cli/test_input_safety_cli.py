"""Programs on inputs that declare more than they may, or that leave their root (issue #14).

Each program runs in a subprocess started by a small Python wrapper that reports the program's
peak resident memory (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of the wrapper, which has
no other child), so the numbers belong to the program alone. The bomb is a ~390 KB greyscale PNG
declaring 20000 x 20000 (400 Mpx, ~10 GB once decoded to float32 RGB), written by
`tests.kit.bombs` without ever holding its pixels.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.kit import bombs, one_conv_backbone, run_command
from tests.kit.cli import extract_command
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store

BOMB_REASON = "image declares 20000x20000 = 400.0 Mpx, over the limit of 89.5 Mpx"
PEAK_RSS_LIMIT = 2 * 1024**3

MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"code": done.returncode, "stderr": done.stderr, "peak": peak}))
    """
)


def _measured(tmp_path, *command):
    """Runs `command` under the wrapper; returns (exit status, stderr, peak RSS in bytes)."""
    wrapper = tmp_path / "measure.py"
    wrapper.write_text(MEASURE)
    result = run_command([sys.executable, str(wrapper), *map(str, command)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["code"], out["stderr"], out["peak"]


def _error_lines(stderr, program):
    """The lines that report bad input: errors, and inputs skipped while the others are answered."""
    prefixes = (f"{program}: error:", f"{program}: skipped ")
    return [line for line in stderr.splitlines() if line.startswith(prefixes)]


def _extract(tree, out, *flags):
    return extract_command(tree, out, "--splits=val", *flags)


def _replace(path, make):
    os.remove(path)
    make(path)


@pytest.mark.slow
def test_extract_keeps_memory_bounded_on_a_bomb_and_a_fifo(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=2, images_per_exhibit=1)
    bomb = tree.image_path(tree.val[0]["path"])
    _replace(bomb, lambda p: bombs.write_png_bomb(p, 20000))
    fifo = tree.image_path(tree.val[1]["path"])
    _replace(fifo, os.mkfifo)
    code, stderr, peak = _measured(tmp_path, *_extract(tree, tmp_path / "out"))
    print(f"tfmet-extract on the bomb: peak RSS {peak / 2**20:.0f} MiB")
    assert code == 0, stderr[-3000:]
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    manifest = store.read_manifest(tmp_path / "out", "val")
    reasons = {e["index"]: e["reason"] for e in manifest["errors"]}
    assert reasons == {0: BOMB_REASON, 1: "not a regular file (a FIFO)"}
    valid = store.read_store(tmp_path / "out", "val").valid
    assert valid.tolist() == [False, False] + [True] * (len(tree.val) - 2)


@pytest.mark.slow
def test_extract_max_pixels_flag(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=1, images_per_exhibit=1)
    out = tmp_path / "out"
    code, stderr, _ = _measured(tmp_path, *_extract(tree, out, "--max_pixels=1700"))
    assert code == 0, stderr[-3000:]
    sizes = [Image.open(tree.image_path(e["path"])).size for e in tree.val]
    expected = {
        i: f"image declares {w}x{h} = {w * h} px, over the limit of 1700 px"
        for i, (w, h) in enumerate(sizes)
        if w * h > 1700
    }
    assert 0 < len(expected) < len(sizes)  # the tree mixes 40x40 and 48x64 images
    reasons = {e["index"]: e["reason"] for e in store.read_manifest(out, "val")["errors"]}
    assert reasons == expected
    code, stderr, _ = _measured(tmp_path, *_extract(tree, tmp_path / "o2", "--max_pixels=0"))
    assert code == 2
    assert _error_lines(stderr, "tfmet-extract") == [
        "tfmet-extract: error: --max_pixels must be a positive integer. Received: 0"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["outside", "dev_zero", "folder"])
def test_extract_refuses_a_link_out_of_the_image_root(tmp_path, target):
    tree = write_met_tree(tmp_path / "met", num_exhibits=1, images_per_exhibit=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    index = 1
    entry = tree.val[index]["path"]
    victim = tree.image_path(entry)
    if target == "folder":  # the entry's folder is a link: its first entry is the one named
        index = 0
        entry = tree.val[index]["path"]
        folder = os.path.dirname(victim)
        os.rename(folder, outside / "moved")
        os.symlink(outside / "moved", folder)
        lands = outside / "moved" / os.path.basename(tree.image_path(entry))
    else:
        lands = "/dev/zero" if target == "dev_zero" else outside / "secret.jpg"
        if target == "outside":
            lands.write_bytes(b"secret")
        _replace(victim, lambda p: os.symlink(lands, p))
    code, stderr, _ = _measured(tmp_path, *_extract(tree, tmp_path / "out"))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines == [
        f"tfmet-extract: error: {tree.info_dir}/valset.json: entry {index}: {entry!r} resolves to "
        f"{lands} through a symbolic link, outside the image root "
        f"{os.path.realpath(os.path.join(tree.image_root, 'images'))}"
    ]
    assert not os.path.exists(tmp_path / "out" / "val_manifest.json")


@pytest.fixture(scope="module")
def style_export(tmp_path_factory):
    """A style SavedModel (3 classes, 32 px) for tfmet-predict."""
    from tfmet.export import save_module
    from tfmet.export.style_classifier import StyleModule
    from tfmet.training.style.model import StyleClassifier, StyleHead

    classifier = StyleClassifier(one_conv_backbone(), StyleHead({"style": ["a", "b", "c"]}))
    classifier.build((None, 32, 32, 3))
    module = StyleModule(classifier, image_size=32, top_k=2)
    metadata = {"kind": "style", "class_names": classifier.class_names, "image_size": 32}
    path = tmp_path_factory.mktemp("style") / "saved_model"
    return save_module(module, path, module.signatures(), metadata)


@pytest.mark.slow
def test_predict_reports_bombs_and_special_files_in_bounded_memory(tmp_path, style_export):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(good)
    bomb = tmp_path / "bomb.png"
    bombs.write_png_bomb(bomb, 20000)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    os.symlink("/dev/zero", zero)
    command = [sys.executable, "-m", "tfmet.cli.predict", f"--model={style_export}", "--json"]
    code, stderr, peak = _measured(tmp_path, *command, good, bomb, fifo, zero)
    print(f"tfmet-predict on the bomb: peak RSS {peak / 2**20:.0f} MiB")
    assert code == 2
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    assert _error_lines(stderr, "tfmet-predict") == [
        f"tfmet-predict: skipped {bomb}: {BOMB_REASON}",
        f"tfmet-predict: skipped {fifo}: not a regular file (a FIFO)",
        f"tfmet-predict: skipped {zero}: not a regular file (a character device)",
    ]
    code, stderr, _ = _measured(tmp_path, *command, "--max_pixels=100", good)
    assert code == 2
    assert _error_lines(stderr, "tfmet-predict") == [
        f"tfmet-predict: skipped {good}: image declares 30x20 = 600 px, over the limit of 100 px",
        "tfmet-predict: error: no image could be read",
    ]


@pytest.fixture(scope="module")
def recognizer_export(tmp_path_factory):
    """A recogniser SavedModel over a random 8-row database (tiny backbone)."""
    from tests.kit import tiny_backbone
    from tfmet.backbones import IMAGENET_TORCH
    from tfmet.descriptors import Embedder
    from tfmet.export import RecognizerModule, save_module

    embedder = Embedder(tiny_backbone(channels=8, seed=3), preprocessing=IMAGENET_TORCH)
    database = np.eye(8, dtype=np.float32)
    module = RecognizerModule(embedder, database, np.arange(8), k=2, tau=10.0)
    path = tmp_path_factory.mktemp("recognizer") / "saved_model"
    return save_module(module, path, module.signatures(), {"kind": "recognizer"})


@pytest.mark.slow
def test_recognize_skips_fifos_devices_and_bombs_in_a_folder(tmp_path, recognizer_export):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "a_good.png")
    bombs.write_png_bomb(folder / "b_bomb.png", 20000)
    os.mkfifo(folder / "c_fifo.jpg")
    os.symlink("/dev/zero", folder / "d_zero.jpg")
    command = [sys.executable, "-m", "tfmet.cli.recognize", f"--model={recognizer_export}"]
    code, stderr, peak = _measured(tmp_path, *command, "--json", "--noprogress", folder)
    print(f"tfmet-recognize on the bomb: peak RSS {peak / 2**20:.0f} MiB")
    assert code == 2, stderr[-3000:]  # the good photo answered, three skipped
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    skipped = [line for line in stderr.splitlines() if line.startswith("tfmet-recognize: skipped")]
    assert skipped[0].startswith(f"tfmet-recognize: skipped {folder / 'b_bomb.png'}: declared")
    assert skipped[1:] == [
        f"tfmet-recognize: skipped {folder / 'c_fifo.jpg'}: not a regular file (a FIFO)",
        f"tfmet-recognize: skipped {folder / 'd_zero.jpg'}: not a regular file (a character "
        "device)",
    ]
