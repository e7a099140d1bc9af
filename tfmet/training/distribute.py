"""Distributed training with tf.distribute: the one place both trainings get their strategy.

`strategy` (config key and `--strategy` flag of tfmet-train-contrastive and tfmet-train-style):

- "default": no distribution (TensorFlow's default strategy: one device, today's behaviour);
- "mirrored": `tf.distribute.MirroredStrategy` over every GPU of this machine (without GPUs:
  every logical CPU device, which is one unless `tf.config.set_logical_device_configuration`
  made more);
- "multi_worker": `tf.distribute.MultiWorkerMirroredStrategy` over the machines that the
  `TF_CONFIG` environment variable describes (one process per machine, the same command on each).

`batch_size` stays the GLOBAL batch: a step's batch is split across the replicas, and each
replica's loss is scaled by the global number of examples, so that the all-reduced gradient is
the single-device one. Only the chief worker writes to the run directory; the other workers of
a multi-worker run write to a temporary copy that is deleted at the end (`worker_workdir`).

The module imports TensorFlow on first use only, so that programs can validate the flag
(`check_strategy`, `check_environment`) before TensorFlow loads.
"""

import contextlib
import json
import os
import shutil
import tempfile

STRATEGIES = ("default", "mirrored", "multi_worker")


def check_strategy(name):
    """`name` when it is one of `STRATEGIES`; raises ValueError otherwise."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {', '.join(STRATEGIES)}. Received: {name!r}")
    return name


def check_environment(name):
    """Raises ValueError when the strategy `name` lacks what it needs (multi_worker: TF_CONFIG
    naming a cluster and this process's task)."""
    check_strategy(name)
    if name != "multi_worker":
        return
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "strategy multi_worker needs the TF_CONFIG environment variable (cluster and task)"
        )
    try:
        tf_config = json.loads(raw)
        tf_config["cluster"], tf_config["task"]["type"], tf_config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            "TF_CONFIG must be JSON with 'cluster' and 'task' ({'type': ..., 'index': ...}). "
            f"Received: {raw!r}"
        ) from None


def make_strategy(name="default"):
    """The `tf.distribute.Strategy` of `name` (see the module docstring)."""
    check_environment(name)
    import tensorflow as tf

    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """True unless `strategy` is a multi-worker one and this process is not its chief (the task
    of type "chief", or worker 0 when the cluster has no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@contextlib.contextmanager
def worker_workdir(workdir, strategy, resume=False):
    """The run directory this process writes to: `workdir` for the chief (every process of the
    "default" and "mirrored" strategies), a temporary directory for the other workers of a
    multi-worker run, deleted on exit.

    Every worker runs the same code (the collective operations must match), so the other
    workers write what the chief writes, where nobody reads it. To resume, they start from a
    copy of the chief's `workdir` (which they must be able to read: a shared file system).
    """
    workdir = os.fspath(workdir)
    if is_chief(strategy):
        yield workdir
        return
    root = tempfile.mkdtemp(prefix="tfmet_worker_")
    try:
        local = os.path.join(root, "run")
        if resume and os.path.isdir(workdir):
            shutil.copytree(workdir, local, ignore=shutil.ignore_patterns("tensorboard"))
        yield local
    finally:
        shutil.rmtree(root, ignore_errors=True)


def split_sizes(total, parts):
    """Rows of a batch of `total` rows that each of `parts` replicas gets, in replica order
    (numpy.array_split's rule: the first `total % parts` replicas get one more)."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


def distribute_batch(strategy, *tensors):
    """Splits a global batch (tensors with the same first dimension) across `strategy`'s
    replicas, in order: replica r gets rows [start_r, start_r + size_r) (`split_sizes`); a
    replica may get no row. With one replica the tensors are returned unchanged.

    Every worker of a multi-worker run passes the same global batch and keeps its replicas'
    rows.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return tensors
    import tensorflow as tf

    total = int(tensors[0].shape[0])
    sizes = split_sizes(total, replicas)
    starts = [sum(sizes[:r]) for r in range(replicas)]

    def piece(tensor):
        def value_fn(context):
            r = context.replica_id_in_sync_group
            return tf.identity(tensor[starts[r] : starts[r] + sizes[r]])

        return strategy.experimental_distribute_values_from_function(value_fn)

    return tuple(piece(tf.convert_to_tensor(t)) for t in tensors)
