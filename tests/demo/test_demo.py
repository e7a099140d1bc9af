"""The demo: visitor photos, the Met-format benchmark, and the end-to-end run and program."""

import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests.kit.cli import REPO
from tests.kit.met_tree import small_benchmark_config, write_met_tree
from tfmet.data import met
from tfmet.demo import benchmark, visitor
from tfmet.demo.run import run_demo

SMALL = small_benchmark_config(
    3, ("chelsea", "coffee", "coins_left", "coins_right", "colorwheel"), test_per_exhibit=2
)


def test_perspective_coefficients_map_target_corners_to_source_corners():
    source = [(0, 0), (100, 0), (100, 50), (0, 50)]
    assert np.allclose(visitor.perspective_coefficients(source, source), [1, 0, 0, 0, 1, 0, 0, 0])
    target = [(10, 5), (90, 12), (95, 70), (3, 60)]
    a, b, c, d, e, f, g, h = visitor.perspective_coefficients(source, target)
    for (u, v), (x, y) in zip(source, target, strict=True):
        w = g * x + h * y + 1
        assert (a * x + b * y + c) / w == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / w == pytest.approx(v, abs=1e-9)


def test_visitor_photo_is_seeded_phone_sized_and_different():
    image = skimage.data.chelsea()
    first, params = visitor.visitor_photo(image, np.random.default_rng(0))
    again, _ = visitor.visitor_photo(image, np.random.default_rng(0))
    other, _ = visitor.visitor_photo(image, np.random.default_rng(1))
    assert first == again and first != other
    photo = Image.open(io.BytesIO(first))
    assert photo.format == "JPEG" and max(photo.size) == params["long_side"]
    assert 320 <= params["long_side"] <= 448 and 35 <= params["jpeg_quality"] <= 85
    assert 0.6 <= min(params["crop"]) and abs(params["rotation"]) <= 12
    # Not a copy: the exhibit is resized, cropped, warped and relit.
    resized = np.asarray(Image.fromarray(image).resize(photo.size), np.float64)
    assert np.abs(np.asarray(photo, np.float64) - resized).mean() > 10


def test_hard_visitor_photos_are_seeded_and_draw_from_the_wider_ranges():
    image = skimage.data.chelsea()
    first, params = visitor.visitor_photo(image, np.random.default_rng(0), visitor.HARD)
    again, _ = visitor.visitor_photo(image, np.random.default_rng(0), visitor.HARD)
    default, default_params = visitor.visitor_photo(image, np.random.default_rng(0))
    assert first == again and first != default
    # The same first draw, a wider range: the crop lands at the same quantile of its range.
    quantile = (default_params["crop"][0] - 0.6) / 0.4
    assert (params["crop"][0] - 0.4) / 0.6 == pytest.approx(quantile)
    assert abs(params["rotation"]) <= 25 and 0.4 <= min(params["crop"])
    assert 256 <= params["long_side"] <= 448 and 25 <= params["jpeg_quality"] <= 85
    photo = Image.open(io.BytesIO(first))
    assert max(photo.size) == params["long_side"]


def test_hard_benchmark_is_deterministic_and_differs_from_the_default(tmp_path):
    hard = dataclasses.replace(SMALL, visitor="hard", test_per_distractor=2)
    first = benchmark.build_benchmark(tmp_path / "a", hard, progress=False)
    second = benchmark.build_benchmark(tmp_path / "b", hard, progress=False)
    default = benchmark.build_benchmark(tmp_path / "c", SMALL, progress=False)
    files = _files(first.root)
    assert files == _files(second.root)
    assert first.provenance["config"]["visitor"] == "hard"
    assert "visitor" not in default.provenance["config"]  # default provenance as before
    assert not benchmark.is_built(first.root, SMALL) and benchmark.is_built(first.root, hard)
    others = _files(default.root)
    assert files["images/MET/1000/0.jpg"] == others["images/MET/1000/0.jpg"]  # same database
    queries = [p for p in files if p.startswith("images/test_")]
    assert len(queries) == 3 * 3 + 2 * 3  # more distractor queries than SMALL's 2 * 2
    assert all(files[p] != others.get(p) for p in queries)
    with pytest.raises(ValueError, match="`visitor` must be one of"):
        benchmark.BenchmarkConfig(visitor="extreme")
    assert benchmark.PRESETS["hard"].visitor == "hard" and benchmark.PRESETS["default"] == (
        benchmark.BenchmarkConfig()
    )


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_benchmark_is_in_the_official_met_format(tmp_path):
    bench = benchmark.build_benchmark(tmp_path / "bench", SMALL, progress=False)
    assert bench.exhibits == {
        1000: "coffee",
        1001: "chelsea",
        1002: "coins_left",
    }  # catalogue order
    with open(os.path.join(bench.info_dir, "MET_database.json")) as f:
        database = json.load(f)
    assert database == [
        {"id": 1000, "path": "MET/1000/0.jpg"},
        {"id": 1001, "path": "MET/1001/0.jpg"},
        {"id": 1002, "path": "MET/1002/0.jpg"},
    ]
    train = met.load_split(bench.info_dir, "train")
    assert met.load_split(bench.info_dir, "train", mini=True).paths == train.paths
    val, test = met.load_split(bench.info_dir, "val"), met.load_split(bench.info_dir, "test")
    # 3 exhibits x (1 val, 2 test) visitor photos; 2 distractors x (1 val, 1 test).
    assert val.labels.tolist() == [1000, 1001, 1002, -1, -1]
    assert test.labels.tolist() == [1000, 1000, 1001, 1001, 1002, 1002, -1, -1]
    assert test.paths[-2].startswith("test_noart/") and test.paths[-1].startswith("test_other/")
    with open(os.path.join(bench.info_dir, "testset.json")) as f:
        entries = json.load(f)
    assert [sorted(e) for e in entries] == [["MET_id", "path"]] * 6 + [["path"]] * 2
    for split in (train, val, test):
        for path in met.image_paths(split, bench.image_root):
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                if split is train:
                    assert max(image.size) == SMALL.database_side
    sources = {q["path"]: q["source"] for q in bench.provenance["queries"]}
    assert sources[test.paths[-2]] == "coins_right" and sources[test.paths[-1]] == "colorwheel"
    assert all("jpeg_quality" in q["visitor_photo"] for q in bench.provenance["queries"])


def test_benchmark_is_reproducible_reused_and_never_overwrites_other_folders(tmp_path):
    first = benchmark.build_benchmark(tmp_path / "a", SMALL, progress=False)
    second = benchmark.build_benchmark(tmp_path / "b", SMALL, progress=False)
    files = _files(first.root)
    assert files == _files(second.root)  # same seed, same bytes
    stamp = os.stat(os.path.join(first.info_dir, "testset.json")).st_mtime_ns
    assert benchmark.is_built(first.root, SMALL)
    benchmark.build_benchmark(first.root, SMALL, progress=False)  # reused, not rewritten
    assert os.stat(os.path.join(first.info_dir, "testset.json")).st_mtime_ns == stamp
    assert not benchmark.is_built(
        first.root, benchmark.BenchmarkConfig(seed=4, photos=SMALL.photos)
    )
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no staging folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a tfmet demo benchmark"):
        benchmark.build_benchmark(tmp_path / "mine", SMALL, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown or unavailable demo photos: mona_lisa"):
        benchmark.build_benchmark(
            tmp_path / "c", benchmark.BenchmarkConfig(photos=("mona_lisa",)), progress=False
        )


def _numpy_gap(train, labels, queries, truth, k, tau):
    """The Met kNN rule and GAP written out in numpy, to check the demo's wiring."""
    classes = np.unique(labels)
    sims = queries @ train.T
    pred, conf = [], []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        score = {}
        for j in top:
            score[labels[j]] = max(score.get(labels[j], 0.0), max(row[j], 0.0))
        best = max(score.values())
        winner = min(label for label, s in score.items() if s == best)
        logits = np.array([score.get(c, 0.0) for c in classes]) * tau
        p = np.exp(logits - logits.max())
        conf.append(p[classes == winner][0] / p.sum())
        pred.append(winner)
    pred, conf = np.array(pred), np.array(conf)
    order = np.argsort(-conf, kind="stable")
    rel = ((pred == truth) & (truth >= 0))[order]
    precision = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float(np.sum(precision * rel) / np.sum(truth >= 0))


def _embedder_file(path):
    """A converted-embedder weights file (trunk + GeM p + projector), as tfmet-convert-weights
    writes for the Met contrastive checkpoints."""
    import keras

    from tfmet.backbones import torch_convert
    from tfmet.descriptors import Embedder

    keras.utils.set_random_seed(0)
    embedder = Embedder.from_registry("resnet_tiny", p=2.0, projector_dim=16)
    embedder.build((None, None, None, 3))
    metadata = {"kind": "embedder", "arch": "resnet_tiny", "projector_dim": 16, "p": 2.0}
    return torch_convert.save_weights(embedder, path, **metadata)


def test_run_demo_end_to_end_with_a_converted_embedder(tmp_path):
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    from tfmet.data import descriptor_store as store

    lines = []
    result = run_demo(
        tmp_path,
        backbone="resnet_tiny",
        weights=_embedder_file(os.path.join(tmp_path, "met_tiny.weights.h5")),
        multiscale=False,
        benchmark_config=SMALL,
        examples=2,
        progress=False,
        log=lines.append,
    )
    assert result.run_name == "resnet_tiny-met_tiny"
    assert (result.num_database, result.num_val, result.num_test) == (3, 5, 8)
    train = store.read_store(result.descriptors, "train", mmap=False).descriptors
    test = store.read_store(result.descriptors, "test", mmap=False).descriptors
    assert train.shape[1] == 16  # the projector's output: the embedder file was used
    info = os.path.join(tmp_path, "benchmark", "info")
    expected = _numpy_gap(
        train,
        met.load_split(info, "train").labels,
        test,
        met.load_split(info, "test").labels,
        result.k,
        result.tau,
    )
    assert result.test["gap"] == pytest.approx(expected, abs=1e-9)
    with open(result.png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = [n for n in os.listdir(result.tensorboard) if n.startswith("events.out.tfevents")]
    assert events
    # One unit and one name: the demo's summaries and printed metrics are fractions named GAP-,
    # as tfmet-knn-eval writes them (its own summaries under knn_eval/).
    for folder in (result.tensorboard, os.path.join(result.tensorboard, "knn_eval")):
        accumulator = event_accumulator.EventAccumulator(folder, size_guidance={"tensors": 0})
        accumulator.Reload()
        for name in ("gap", "gap_minus", "acc"):
            (event,) = accumulator.Tensors(f"test/{name}")
            logged = float(tf.make_ndarray(event.tensor_proto))
            assert logged == pytest.approx(result.test[name], rel=1e-6)
    test = result.test
    assert (
        f"      resnet_tiny-met_tiny: GAP {test['gap']:.3f}  GAP- {test['gap_minus']:.3f}  "
        f"ACC {test['acc']:.3f}" in lines
    )
    with open(os.path.join(result.descriptors, "knn_results.json")) as f:
        assert set(json.load(f)["threshold"]) == {"value", "rule", "val", "test"}
    assert f"tfmet-serve --model {os.path.join(tmp_path, 'recognizer')}" in result.serve_command


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from tfmet.cli import demo; demo.run()", *args],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_on_a_users_met_folder(tmp_path):
    # Folders with spaces in their names, as on many desktops: the printed commands still run.
    tree = write_met_tree(tmp_path / "the met")
    workdir = tmp_path / "my work"
    done = _cli(
        f"--workdir={workdir}",
        "--backbone=resnet_tiny",
        "--weights=random",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        "--nomultiscale",
        "--noprogress",
        "--examples=2",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Summary (test queries):" in done.stdout and "GAP-" in done.stdout
    # It ends with the commands that show this run in tfmet-serve's web page, and the script
    # (what `make serve` runs) that holds them.
    last = done.stdout.strip().splitlines()[-3:]
    export, serve = shlex.split(last[0]), shlex.split(last[1])
    export_dir = str(workdir / "recognizer" / "resnet_tiny-random-seed0")
    assert export[:5] == ["tfmet-export", "--kind", "recognizer", "--out", export_dir]
    results_json = workdir / "descriptors" / "resnet_tiny-random-seed0" / "knn_results.json"
    assert _flag(export, "--results_json") == str(results_json)
    assert _flag(export, "--backbone") == "resnet_tiny" and _flag(export, "--seed") == "0"
    assert serve[:3] == ["tfmet-serve", "--model", export_dir]
    assert _flag(serve, "--info_dir") == tree.info_dir
    assert _flag(serve, "--image_root") == tree.image_root
    assert "--names" not in serve  # a user's Met folder has no exhibit names to show
    assert last[2] == f"(or: make serve, which runs {workdir / 'serve.sh'})"
    script = (workdir / "serve.sh").read_text(encoding="utf-8")
    assert f"|| {last[0].strip()} --force\n" in script
    assert f'exec {last[1].strip()} "$@"\n' in script
    # The export line, run by a shell as printed, writes the recogniser where serve looks.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    exported = subprocess.run(
        ["sh", "-c", last[0]], capture_output=True, text=True, env=env, timeout=600
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert os.path.isfile(os.path.join(export_dir, "saved_model.pb"))
    assert (workdir / "matches-resnet_tiny-random-seed0.png").exists()
    assert not (workdir / "benchmark").exists()  # the user's folder was used, none was built


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    failed = _cli(f"--workdir={tmp_path}", "--backbone=resnet18")  # default --weights imagenet
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("tfmet-demo: error: no packaged ImageNet weights for backbone")
