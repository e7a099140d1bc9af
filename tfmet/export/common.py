"""Pieces shared by the export modules: per-example decoding that never fails, saving rules."""

import json
import os
import shutil
import tempfile

import tensorflow as tf

from tfmet.data.images import cap_max_side, decode_image


def map_image_bytes(image_bytes, fn, output_shape, dtype=tf.float32, max_side=None):
    """Applies `fn(image [1, H, W, 3] float 0-255) -> [*output_shape]` to each encoded image.

    Images of different sizes are handled one by one. An element whose bytes do not decode (empty,
    truncated, not an image) or whose `fn` fails is skipped instead of failing the batch.

    Returns:
      (outputs [N, *output_shape] with zeros for failed elements, valid [N] bool).
    """
    n = tf.shape(image_bytes)[0]

    def describe(index, data):
        image = decode_image(data)
        image = cap_max_side(image, max_side) if max_side else image
        return index, fn(image[None])

    dataset = tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes))
    dataset = dataset.map(describe).ignore_errors()
    outputs = tf.zeros(tf.concat([[n], output_shape], axis=0), dtype)
    valid = tf.zeros([n], tf.bool)

    def scatter(state, element):
        out, ok = state
        index, value = element
        out = tf.tensor_scatter_nd_update(out, [[index]], [value])
        ok = tf.tensor_scatter_nd_update(ok, [[index]], [True])
        return out, ok

    return dataset.reduce((outputs, valid), scatter)


def check_export_dir(path, force=False):
    """Refuses to overwrite an existing export unless `force`."""
    if os.path.exists(path) and os.listdir(path):
        if not force:
            raise FileExistsError(f"{path}: export directory exists and is not empty (use --force)")


def save_module(module, path, signatures, metadata, force=False):
    """Saves `module` with `signatures` to `path`, metadata as assets/tfmet_metadata.json.

    The SavedModel is written to a temporary folder next to `path` and renamed into place, so a
    failed export never leaves a half-written model behind (nor destroys the previous one before
    the new one is complete).
    """
    path = os.path.abspath(os.fspath(path))
    check_export_dir(path, force)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        meta_file = os.path.join(staging, "tfmet_metadata.json")
        with open(meta_file, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
        module.metadata_asset = tf.saved_model.Asset(meta_file)
        concrete = {name: _concrete(fn) for name, fn in signatures.items()}
        track_captured_variables(module, concrete.values())
        target = os.path.join(staging, "model")
        tf.saved_model.save(module, target, signatures=concrete)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _concrete(fn):
    return fn.get_concrete_function() if hasattr(fn, "get_concrete_function") else fn


def track_captured_variables(module, concrete_functions):
    """Makes `module` track the tf.Variables the functions capture.

    tf.Module does not see Keras 3 variables, and tracking the Keras wrappers does not bind the
    functions' captures in TF1-style loaders (TF Serving, saved_model_cli): the SavedModel must
    track the captured tf.Variables themselves (as keras.export.ExportArchive does).
    """
    captured, seen = [], set()
    for fn in concrete_functions:
        for variable in fn.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                captured.append(variable)
    module.captured_variables = captured


def metadata_signature(metadata):
    """A tf.function with no inputs returning `metadata` (str/int/float values) as tensors."""
    constants = {key: tf.constant(value) for key, value in sorted(metadata.items())}

    @tf.function(input_signature=[])
    def metadata_fn():
        return dict(constants)

    return metadata_fn
