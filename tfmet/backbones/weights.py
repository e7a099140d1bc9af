"""Loading Keras `.weights.h5` files with errors that say what does not match.

The format is the one `keras.Model.save_weights` writes (the checkpoint converter writes it the
same way: build the Keras model, set its weights, `save_weights`). It is an HDF5 file with one
group per layer, addressed by the layer's position in the model rather than its name: the n-th
layer of a class, in `model.layers` order, is `layers/<snake_case class name>[_<n>]`, nested
Functional/Sequential models add their own `layers/...` level, and a layer's variables are
`<group>/vars/0, 1, ...` (trainable first, then non-trainable); subclassed models add their
attribute names (`backbone/layers/conv2d/vars/0`). The layer's name is kept in the "name"
attribute of the `vars` group.

`load_weights` first compares the file's entries with those the model would write (found by
running Keras's own saving walk with a recording store, so no values are copied) and raises a
ValueError naming the file and the first missing, unexpected or mis-shaped variable by layer
name (with both shapes), instead of Keras's generic message, its flood of warnings, or silence
for extra entries. Optimizer and compiled-metric state is not compared.
"""

import os

import h5py
import keras

# {entry path: (layer name, [(variable name, shape), ...])}
Layout = dict[str, tuple[str, list[tuple[str, tuple[int, ...]]]]]

# Non-layer state a file may or may not carry (optimizer slots, compiled metrics).
_IGNORED_ROOTS = ("optimizer", "compile_metrics", "compile_loss", "loss_tracker")


def _entry(path: str) -> str:
    return path or "<model>"


def _ignored(path: str) -> bool:
    return path.split("/")[0] in _IGNORED_ROOTS


def expected_layout(model: keras.Model) -> Layout | None:
    """The entries `model.save_weights` would write: walked by Keras's own saving code.

    The walk uses Keras's internal saver with a store that records paths and shapes instead of
    writing, so it is exact for any model (Functional, Sequential, subclassed) and costs no
    memory. Returns None if this Keras version's internals differ (the caller then relies on
    Keras's own, vaguer checks).
    """
    try:
        from keras.src.saving import saving_lib

        class _Recorder(saving_lib.H5IOStore):
            def __init__(self):  # no file: only the layout is recorded
                self.layout: Layout = {}
                self._path = ""
                self._name = "?"

            def __bool__(self):
                return True

            def make(self, path, metadata=None):
                self._path, self._name = path, (metadata or {}).get("name", "?")
                return self

            def __setitem__(self, key, value):
                entry = self.layout.setdefault(self._path, (self._name, {}))
                entry[1][key] = (getattr(value, "name", key), tuple(value.shape))

            def close(self):
                pass

        recorder = _Recorder()
        saving_lib._save_state(
            model,
            weights_store=recorder,
            assets_store=None,
            inner_path="",
            visited_saveables=set(),
        )
    except (ImportError, AttributeError, TypeError):
        return None
    return {
        path: (name, [variables[k] for k in sorted(variables, key=int)])
        for path, (name, variables) in recorder.layout.items()
        if not _ignored(path)
    }


def file_layout(path: str) -> Layout:
    """The entries of a `.weights.h5` file (optimizer and metric state skipped)."""
    layout: Layout = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if not isinstance(obj, h5py.Group) or not (name == "vars" or name.endswith("/vars")):
                return
            entry = name[: -len("vars")].rstrip("/")
            if _ignored(entry) or not len(obj):
                return
            layer_name = obj.attrs.get("name", "?")
            if isinstance(layer_name, bytes):
                layer_name = layer_name.decode()
            keys = sorted(obj.keys(), key=int)
            layout[entry] = (str(layer_name), [(k, tuple(obj[k].shape)) for k in keys])

        f.visititems(visit)
    return layout


def check_layout(model: keras.Model, path: str) -> None:
    """Raises ValueError naming `path` and the first difference between it and `model`."""
    expected = expected_layout(model)
    if expected is None:
        return
    found = file_layout(path)
    prefix = f"Weights file {path} does not match model {model.name!r}:"
    for entry, (layer_name, variables) in expected.items():
        if entry not in found:
            raise ValueError(
                f"{prefix} layer {layer_name!r} (entry {_entry(entry)}) is missing from the file."
            )
        file_name, file_variables = found[entry]
        if len(file_variables) != len(variables):
            raise ValueError(
                f"{prefix} layer {layer_name!r} (entry {_entry(entry)}) has {len(variables)} "
                f"variables, the file has {len(file_variables)} there (saved from layer "
                f"{file_name!r})."
            )
        for (variable, want), (_, have) in zip(variables, file_variables, strict=True):
            if want != have:
                raise ValueError(
                    f"{prefix} layer {layer_name!r} variable {variable!r} has shape {want}, the "
                    f"file has shape {have} (saved from layer {file_name!r}, entry "
                    f"{_entry(entry)})."
                )
    for entry, (file_name, _) in found.items():
        if entry not in expected:
            raise ValueError(
                f"{prefix} unexpected entry {_entry(entry)} (saved from layer {file_name!r}) has "
                "no counterpart in the model."
            )


def load_weights(model: keras.Model, path) -> keras.Model:
    """Loads a Keras weights file into `model` and returns the model.

    `.weights.h5` files (Keras 3 `save_weights`, `tfmet-convert-weights`) are checked against
    the model first. Legacy Keras 2 `.h5` / `.hdf5` weight files, such as the keras.applications
    downloads (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`), are matched by Keras in
    layer order; their errors are re-raised naming the file.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is not a readable weights file, or its layers/variables differ from
        the model's (the message names the file and the first mismatching layer and variable,
        with both shapes for a shape mismatch).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    if not path.endswith((".weights.h5", ".h5", ".hdf5")):
        raise ValueError(
            f"Weights file {path}: expected a Keras '.weights.h5' file (written by "
            "model.save_weights or tfmet-convert-weights) or a legacy '.h5' weights file."
        )
    if path.endswith(".weights.h5"):
        try:
            check_layout(model, path)
        except OSError as e:
            raise ValueError(f"Weights file {path} is not a readable HDF5 file: {e}") from e
    try:
        model.load_weights(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"Weights file {path} could not be loaded into {model.name!r}: {e}") from e
    return model
