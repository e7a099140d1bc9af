"""The style trainings' resumable checkpoint: `<workdir>/checkpoints/` holds `last.weights.npz`,
`last_optimizer.npz`, `state.json` and `best.weights.npz`, swapped in as one set
(`write_checkpoint`). Weights files hold one array per `model.weights` entry, in order, with the
variable paths; no pickle.
"""

import json
import os
import shutil

import keras
import numpy as np

from tfmet.io.atomic import (
    atomic_path,
    recover_directory,
    replace_directory,
    save_json,
    staging_directory,
)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_paths(workdir):
    return _checkpoint_files(os.path.join(workdir, CHECKPOINT_DIR))


def _checkpoint_files(directory):
    return {
        "dir": directory,
        "last": os.path.join(directory, "last.weights.npz"),
        "optimizer": os.path.join(directory, "last_optimizer.npz"),
        "state": os.path.join(directory, "state.json"),
        "best": os.path.join(directory, "best.weights.npz"),
    }


def has_checkpoint(workdir):
    """Whether `workdir` holds a checkpoint (after undoing a checkpoint swap a kill cut short)."""
    recover_directory(checkpoint_paths(workdir)["dir"])
    return os.path.exists(checkpoint_paths(workdir)["state"])


def write_checkpoint(model, state, workdir, improved):
    """Writes the epoch's checkpoint as one set: last weights, optimizer, state and best weights.

    The set is built in a new folder and swapped in for `checkpoints/` (`replace_directory`), so
    a kill at any instant leaves the previous epoch's set or this one: never best weights one
    epoch ahead of the state that names their epoch and top-1. Best weights that did not change
    are carried over by hard link (a copy where links are not possible).
    """
    paths = checkpoint_paths(workdir)
    staging = staging_directory(os.fspath(workdir), "checkpoints")
    try:
        new = _checkpoint_files(staging)
        if improved:
            save_weights(model, new["best"])
        elif os.path.exists(paths["best"]):
            try:
                os.link(paths["best"], new["best"])
            except OSError:
                shutil.copy2(paths["best"], new["best"])
        save_weights(model, new["last"])
        save_optimizer(model.optimizer, new["optimizer"])
        save_json(new["state"], state)
        replace_directory(staging, paths["dir"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_weights(model, path):
    """Writes `model.weights` (values in order, and their paths) to an .npz file atomically."""
    arrays = {f"w{i:05d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, paths=np.array([v.path for v in model.weights], dtype=str), **arrays)


def load_weights(model, path):
    """Loads a `save_weights` file into a model of the same architecture.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file's number or shapes of arrays differ from the model's weights.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = sorted(k for k in data.files if k.startswith("w"))
            values = [data[k] for k in keys]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable weights file ({e})") from None
    if len(values) != len(model.weights):
        raise ValueError(
            f"{path}: holds {len(values)} arrays, model {model.name!r} has "
            f"{len(model.weights)} weights"
        )
    for variable, value in zip(model.weights, values, strict=True):
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"{path}: weight {variable.path!r} has shape {tuple(variable.shape)}, the file "
                f"has {value.shape}"
            )
    for variable, value in zip(model.weights, values, strict=True):
        variable.assign(value)
    return model


def save_optimizer(optimizer, path):
    store = {}
    optimizer.save_own_variables(store)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in store.items()})


def load_optimizer(optimizer, variables, path):
    optimizer.build(variables)
    with np.load(path, allow_pickle=False) as data:
        store = {k: data[k] for k in data.files}
    if len(store) != len(optimizer.variables):
        raise ValueError(
            f"{path}: optimizer state has {len(store)} variables, the optimizer has "
            f"{len(optimizer.variables)}; the model or its trainable layers changed since the "
            "checkpoint was written"
        )
    optimizer.load_own_variables(store)


def read_state(workdir):
    with open(checkpoint_paths(workdir)["state"], encoding="utf-8") as f:
        return json.load(f)
