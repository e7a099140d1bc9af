"""tfmet.training.distribute and both trainings under tf.distribute strategies.

The equality tests train the smoke configs twice with the same global batch: on one device and
split across 2 logical CPU devices (MirroredStrategy, in a fresh process: tests/training/
two_devices.py), or across 2 local worker processes that TF_CONFIG joins on 127.0.0.1
(MultiWorkerMirroredStrategy). The trained weights must agree to float rounding.
"""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.kit import REPO, run_cli, run_command
from tfmet.training import distribute


def _weights(path):
    with np.load(path) as data:
        return [data[k] for k in sorted(data.files) if k.startswith("w")]


def _assert_same_weights(expected, actual, atol):
    assert len(expected) == len(actual) and len(expected) > 0
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


# -- the library -------------------------------------------------------------------------------


def test_strategy_names_and_environment(monkeypatch):
    assert distribute.STRATEGIES == ("default", "mirrored", "multi_worker")
    assert distribute.check_strategy("mirrored") == "mirrored"
    with pytest.raises(ValueError, match="`strategy` must be one of .* Received: 'tpu'"):
        distribute.check_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    distribute.check_environment("default")
    with pytest.raises(ValueError, match="multi_worker needs the TF_CONFIG"):
        distribute.check_environment("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON with 'cluster' and 'task'"):
        distribute.check_environment("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(_tf_config([1, 2], 1)))
    distribute.check_environment("multi_worker")


def test_default_strategy_is_tensorflows_and_leaves_batches_alone():
    import tensorflow as tf

    strategy = distribute.make_strategy("default")
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    batch = tf.constant([[1.0], [2.0], [3.0]])
    (same,) = distribute.distribute_batch(strategy, batch)
    assert same is batch
    assert distribute.is_chief(strategy)


def test_split_sizes_follow_array_split():
    assert distribute.split_sizes(7, 2) == [4, 3]
    assert distribute.split_sizes(1, 2) == [1, 0]
    assert distribute.split_sizes(6, 4) == [2, 2, 1, 1]
    for total, parts in ((7, 2), (1, 2), (6, 4), (0, 3)):
        expected = [len(p) for p in np.array_split(np.arange(total), parts)]
        assert distribute.split_sizes(total, parts) == expected


def _fake_strategy(task_type, task_id, cluster):
    spec = types.SimpleNamespace(as_dict=lambda: cluster)
    resolver = types.SimpleNamespace(
        task_type=task_type, task_id=task_id, cluster_spec=lambda: spec
    )
    return types.SimpleNamespace(cluster_resolver=resolver)


def test_chief_writes_the_workdir_other_workers_a_deleted_copy(tmp_path):
    workers = {"worker": ["a:1", "b:2"]}
    assert distribute.is_chief(_fake_strategy("worker", 0, workers))
    assert not distribute.is_chief(_fake_strategy("worker", 1, workers))
    with_chief = {"chief": ["c:0"], "worker": ["a:1"]}
    assert distribute.is_chief(_fake_strategy("chief", 0, with_chief))
    assert not distribute.is_chief(_fake_strategy("worker", 0, with_chief))

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "state.json").write_text("{}")
    (workdir / "tensorboard").mkdir()
    with distribute.worker_workdir(workdir, _fake_strategy("worker", 0, workers)) as path:
        assert path == str(workdir)
    other = _fake_strategy("worker", 1, workers)
    with distribute.worker_workdir(workdir, other, resume=True) as path:
        assert path != str(workdir)
        assert os.path.exists(os.path.join(path, "checkpoints", "state.json"))
        assert not os.path.exists(os.path.join(path, "tensorboard"))  # not needed to resume
    assert not os.path.exists(path)
    with distribute.worker_workdir(workdir, other) as path:
        assert not os.path.exists(path)  # a fresh run starts empty
        os.makedirs(path)
    assert not os.path.exists(os.path.dirname(path))


def test_configs_default_to_the_default_strategy():
    from tfmet.training.contrastive.config import check_config, default_config
    from tfmet.training.style.config import default_config as style_default

    assert default_config().strategy == "default"
    assert style_default().train.strategy == "default"
    config = default_config().to_dict()
    config["strategy"] = "parameter_server"
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        check_config(config)


# -- the programs refuse a bad strategy before writing anything -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "program, args",
    [
        ("train_contrastive", ["--info_dir", "{dir}", "--image_root", "{dir}"]),
        ("train_style", ["--config", os.path.join(REPO, "configs", "pandora18k.py:smoke")]),
    ],
)
def test_programs_refuse_bad_strategies_in_one_line(tmp_path, program, args):
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    workdir = tmp_path / "run"
    env = {"TF_CONFIG": ""}
    bad = run_cli(program, *args, "--workdir", workdir, "--strategy", "tpu", env=env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"tfmet-{program.replace('_', '-')}: error: --strategy: `strategy` must be one of "
        "default, mirrored, multi_worker. Received: 'tpu'"
    ]
    alone = run_cli(program, *args, "--workdir", workdir, "--strategy", "multi_worker", env=env)
    assert alone.returncode == 2, alone.stderr
    assert alone.stderr.strip().splitlines() == [
        f"tfmet-{program.replace('_', '-')}: error: --strategy: strategy multi_worker needs the "
        "TF_CONFIG environment variable (cluster and task)"
    ]
    assert not workdir.exists()


# -- 2 logical CPU devices give the single-device weights -------------------------------------


def _two_devices(kind, directory):
    done = run_command([sys.executable, "-m", "tests.training.two_devices", kind, directory])
    assert done.returncode == 0, done.stderr[-3000:]
    records = {}
    for name in ("default", "mirrored"):
        with open(os.path.join(directory, f"{name}.json"), encoding="utf-8") as f:
            records[name] = json.load(f)
    weights = {n: _weights(os.path.join(directory, f"{n}.npz")) for n in records}
    return records, weights


@pytest.mark.slow
def test_contrastive_on_two_devices_equals_one_device(tmp_path):
    records, weights = _two_devices("contrastive", str(tmp_path))
    one, two = records["default"], records["mirrored"]
    assert one["replicas"] == 1 and two["replicas"] == 2
    assert one["global_step"] == two["global_step"] == 3  # 16 pairs, 3 a batch, 2 a step
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["val_gap"] == pytest.approx(one["val_gap"], abs=1e-6)
    assert two["val_acc"] == pytest.approx(one["val_acc"], abs=1e-6)
    # the mirrored run stopped after one step and resumed; the weights still agree
    _assert_same_weights(weights["default"], weights["mirrored"], atol=1e-5)


@pytest.mark.slow
def test_style_on_two_devices_equals_one_device(tmp_path):
    records, weights = _two_devices("style", str(tmp_path))
    one, two = records["default"], records["mirrored"]
    assert one["best_epoch"] == two["best_epoch"]
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b.keys() == a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    _assert_same_weights(weights["default"], weights["mirrored"], atol=1e-4)


# -- 2 worker processes joined by TF_CONFIG give the single-process weights -------------------


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports, index):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return {"cluster": cluster, "task": {"type": "worker", "index": index}}


def _run_workers(command, count=2, timeout=300):
    """`command` in `count` worker processes of one TF_CONFIG cluster; their CompletedProcess-like
    (returncode, stdout, stderr) triples."""
    ports = _free_ports(count)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(env, TF_CONFIG=json.dumps(_tf_config(ports, i))),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _run_alone_and_on_two_workers(tmp_path, program, config, *flags):
    """`tfmet.cli.<program> --config configs/<config> FLAGS` in one process (workdir
    tmp_path/single, the default strategy), then on 2 workers (tmp_path/multi, multi_worker)."""

    def command(run, strategy):
        return [
            sys.executable, "-m", f"tfmet.cli.{program}",
            "--config", os.path.join(REPO, "configs", config), *flags,
            f"--workdir={tmp_path / run}", f"--strategy={strategy}",
        ]  # fmt: skip

    single = run_command(command("single", "default"))
    assert single.returncode == 0, single.stderr[-3000:]
    for returncode, _, err in _run_workers(command("multi", "multi_worker")):
        assert returncode == 0, err[-3000:]


@pytest.mark.slow
def test_style_on_two_workers_equals_one_process(dataset, tmp_path):
    _run_alone_and_on_two_workers(
        tmp_path,
        "train_style",
        "pandora18k.py:smoke",
        f"--config.dataset.root={dataset}",
        "--config.dataset.split_fractions=(0.5, 0.3, 0.2)",
        f"--config.cache_dir={tmp_path / 'cache'}",
        "--config.train.epochs=2",
        "--config.train.batch_size=7",
        "--config.train.patience=0",
    )
    expected = _weights(tmp_path / "single" / "checkpoints" / "last.weights.npz")
    actual = _weights(tmp_path / "multi" / "checkpoints" / "last.weights.npz")
    _assert_same_weights(expected, actual, atol=1e-5)
    summaries = [
        json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "multi")
    ]
    assert summaries[1]["best_val_top1"] == pytest.approx(summaries[0]["best_val_top1"])


@pytest.mark.slow
def test_contrastive_on_two_workers_equals_one_process(tmp_path):
    import tensorflow as tf

    from tests.kit.met_tree import write_met_tree

    tree = write_met_tree(tmp_path / "met")

    _run_alone_and_on_two_workers(
        tmp_path,
        "train_contrastive",
        "met_contrastive_r18.py:smoke",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        "--epochs=1",
        "--config.batch_size=3",
        "--stop_at_step=2",
    )
    readers = [
        tf.train.load_checkpoint(str(tmp_path / run / "checkpoints")) for run in ("single", "multi")
    ]
    names = sorted(
        name
        for name in readers[0].get_variable_to_shape_map()
        if name.startswith("embedder/") and "OPTIMIZER_SLOT" not in name
    )
    assert len(names) > 10
    for name in names:
        np.testing.assert_allclose(
            readers[1].get_tensor(name), readers[0].get_tensor(name), rtol=0, atol=1e-5
        )
    assert readers[1].get_tensor("step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert sorted(os.listdir(tmp_path / "multi")) == sorted(os.listdir(tmp_path / "single"))
