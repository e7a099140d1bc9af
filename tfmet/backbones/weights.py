"""Loading Keras `.weights.h5` files with errors that say what does not match.

The format is the one `keras.Model.save_weights` writes (the checkpoint converter writes it the
same way: build the Keras model, set its weights, `save_weights`). It is an HDF5 file with one
group per layer, addressed by the layer's position in the model rather than its name: the n-th
layer of a class, in `model.layers` order, is `layers/<snake_case class name>[_<n>]`, nested
Functional/Sequential models add their own `layers/...` level, and a layer's variables are
`<group>/vars/0, 1, ...` (trainable first, then non-trainable). The layer's name is kept in the
"name" attribute of the `vars` group.

`load_weights` first compares the file's layout with the one the model would write and raises a
ValueError naming the file and the first missing, unexpected or mis-shaped variable by layer
name (with both shapes), instead of Keras's generic message - or silence, which is what Keras
gives for extra entries. Models whose layout cannot be predicted (custom layers that own
sublayers outside a Functional/Sequential `layers` list) are left to Keras's own checks.
"""

import os
import re

import h5py
import keras

# {group path: (layer name, [variable shapes])}
Layout = dict[str, tuple[str, list[tuple[int, ...]]]]

_GROUP_PATH = re.compile(r"^layers/[^/]+(/layers/[^/]+)*$")


def _snake_case(name: str) -> str:
    """Keras's naming.to_snake_case, which gives the group names."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_layer_list_model(layer) -> bool:
    """Functional and Sequential models save their sublayers as the `layers` list."""
    return isinstance(layer, keras.Sequential) or any(
        cls.__name__ == "Functional" for cls in type(layer).__mro__
    )


def _own_variables(layer) -> list:
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _children(model) -> list[tuple[str, keras.layers.Layer]]:
    """(group name, layer) for each layer of a Functional/Sequential model, as Keras names them."""
    used: dict[str, int] = {}
    children = []
    for child in model.layers:
        base = _snake_case(type(child).__name__)
        used[base] = used.get(base, -1) + 1
        children.append((base if used[base] == 0 else f"{base}_{used[base]}", child))
    return children


def expected_layout(model: keras.Model) -> tuple[Layout, dict[str, keras.layers.Layer]] | None:
    """The layout `model.save_weights` would write, and the layer at each group path.

    None when it cannot be predicted (see the module docstring).
    """
    layout: Layout = {}
    layers: dict[str, keras.layers.Layer] = {}

    def walk(model, prefix) -> bool:
        for child_name, child in _children(model):
            path = f"{prefix}layers/{child_name}"
            own = _own_variables(child)
            if own:
                layout[path] = (child.name, [tuple(v.shape) for v in own])
                layers[path] = child
            if _is_layer_list_model(child):
                if not walk(child, path + "/"):
                    return False
            elif any(_own_variables(sub) for sub in child._flatten_layers(include_self=False)):
                return False
        return True

    if not _is_layer_list_model(model) or not walk(model, ""):
        return None
    return layout, layers


def file_layout(path: str) -> Layout:
    """The layer groups of a `.weights.h5` file (optimizer and other entries are skipped)."""
    layout: Layout = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if not (isinstance(obj, h5py.Group) and name.endswith("/vars")):
                return
            group_path = name[: -len("/vars")]
            if not _GROUP_PATH.match(group_path) or not len(obj):
                return
            layer_name = obj.attrs.get("name", "?")
            if isinstance(layer_name, bytes):
                layer_name = layer_name.decode()
            keys = sorted(obj.keys(), key=int)
            layout[group_path] = (str(layer_name), [tuple(obj[k].shape) for k in keys])

        f.visititems(visit)
    return layout


def check_layout(model: keras.Model, path: str) -> None:
    """Raises ValueError naming `path` and the first difference between it and `model`."""
    expected = expected_layout(model)
    if expected is None:
        return
    layout, layers = expected
    found = file_layout(path)
    prefix = f"Weights file {path} does not match model {model.name!r}:"
    for group, (layer_name, shapes) in layout.items():
        if group not in found:
            raise ValueError(
                f"{prefix} layer {layer_name!r} (entry {group}) is missing from the file."
            )
        file_name, file_shapes = found[group]
        if len(file_shapes) != len(shapes):
            raise ValueError(
                f"{prefix} layer {layer_name!r} (entry {group}) has {len(shapes)} variables, "
                f"the file has {len(file_shapes)} there (saved from layer {file_name!r})."
            )
        variables = _own_variables(layers[group])
        for variable, want, have in zip(variables, shapes, file_shapes, strict=True):
            if want != have:
                raise ValueError(
                    f"{prefix} layer {layer_name!r} variable {variable.name!r} has shape "
                    f"{want}, the file has shape {have} (saved from layer {file_name!r}, "
                    f"entry {group})."
                )
    for group, (file_name, _) in found.items():
        if group not in layout:
            raise ValueError(
                f"{prefix} unexpected entry {group} (saved from layer {file_name!r}) has no "
                "counterpart in the model."
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
