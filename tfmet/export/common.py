"""Pieces shared by the export modules: per-example decoding that never fails, saving rules."""

import json
import os
import re
import shutil

import numpy as np
import tensorflow as tf

from tfmet.data.images import (
    DEFAULT_MAX_PIXELS,
    cap_max_side,
    decode_unchecked,
    jpeg_within_limits,
    within_limits,
)
from tfmet.data.limits import DEFAULT_MAX_BYTES
from tfmet.io.atomic import clean_stale_temporaries, replace_directory, staging_directory


def decode_image_batch(
    image_bytes, max_side=None, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES
):
    """Decodes each encoded image of `image_bytes` [N]; undecodable ones are flagged, not raised.

    An image whose header declares more than `max_pixels` pixels is not decoded: it is flagged
    like an undecodable one (`tfmet.data.images.decode_image`), so a small file declaring a huge
    canvas costs nothing; so is an image of more than `max_bytes` bytes (None: no limit), as
    tfmet-extract refuses such a file.

    Only the decoding runs in a tf.data pipeline (whose `ignore_errors` is the graph-mode way to
    survive a bad element); keeping the model out of it avoids re-optimising the model's graph
    on every call.

    Returns:
      (pixels: a TensorArray of N flattened images (unwritten for failed elements),
       shapes: int32 [N, 2] (height, width; 0 for failed elements), valid: bool [N]).
    """
    n = tf.shape(image_bytes)[0]

    # The header checks run here, in the signature's graph, built once; the dataset (made anew at
    # every call, its map function with it) only decodes and reads a JPEG's SOF marker (which
    # raises for a broken header: its ignore_errors drops the element). With every check inside
    # its map, a one-image request cost ~0.3 s more (and ~0.5 s more again with tf.data's default
    # rewrites, which change nothing that it yields).
    def header(data):
        is_jpeg = tf.io.is_jpeg(data)
        allowed = tf.cond(
            is_jpeg, lambda: tf.constant(True), lambda: within_limits(data, max_pixels)
        )
        return is_jpeg, allowed

    is_jpeg, allowed = tf.map_fn(header, image_bytes, fn_output_signature=(tf.bool, tf.bool))
    if max_bytes is not None:
        allowed &= tf.strings.length(image_bytes) <= int(max_bytes)

    def decode(index, data, allowed, is_jpeg):
        ok = tf.cond(
            is_jpeg, lambda: jpeg_within_limits(data, max_pixels), lambda: tf.constant(True)
        )
        with tf.control_dependencies([tf.debugging.Assert(ok, ["over the limits"])]):
            image = decode_unchecked(data)
        return index, cap_max_side(image, max_side) if max_side else image

    dataset = tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes, allowed, is_jpeg))
    dataset = dataset.filter(lambda index, data, allowed, is_jpeg: allowed)
    dataset = dataset.map(decode).ignore_errors()
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    dataset = dataset.with_options(options)

    def collect(state, element):
        pixels, shapes, valid = state
        index, image = element
        pixels = pixels.write(index, tf.reshape(image, [-1]))
        shapes = tf.tensor_scatter_nd_update(shapes, [[index]], [tf.shape(image)[:2]])
        valid = tf.tensor_scatter_nd_update(valid, [[index]], [True])
        return pixels, shapes, valid

    # Entries of failed elements stay unwritten: read them only where `valid`.
    pixels = tf.TensorArray(tf.float32, size=n, element_shape=[None], infer_shape=False)
    initial = (pixels, tf.zeros([n, 2], tf.int32), tf.zeros([n], tf.bool))
    return dataset.reduce(initial, collect)


def map_image_bytes(
    image_bytes,
    fn,
    output_shape,
    dtype=tf.float32,
    max_side=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    max_bytes=DEFAULT_MAX_BYTES,
):
    """Applies `fn(image [1, H, W, 3] float 0-255) -> [*output_shape]` to each encoded image.

    Images of different sizes are handled one by one. An element whose bytes do not decode (empty,
    truncated, not an image, declaring more than `max_pixels` pixels or holding more than
    `max_bytes` bytes) is skipped instead of failing the batch.

    Returns:
      (outputs [N, *output_shape] with zeros for failed elements, valid [N] bool).
    """
    pixels, shapes, valid = decode_image_batch(image_bytes, max_side, max_pixels, max_bytes)
    n = tf.shape(shapes)[0]
    zeros = tf.zeros(output_shape, dtype)

    def describe(i):
        image = tf.reshape(pixels.read(i), [shapes[i, 0], shapes[i, 1], 3])
        return tf.cast(fn(image[None]), dtype)

    def body(i, outputs):
        return i + 1, outputs.write(i, tf.cond(valid[i], lambda: describe(i), lambda: zeros))

    outputs = tf.TensorArray(dtype, size=n, element_shape=output_shape)
    _, outputs = tf.while_loop(lambda i, _: i < n, body, (0, outputs))
    return tf.reshape(outputs.stack(), tf.concat([[n], output_shape], axis=0)), valid


# What TensorFlow accepts as a root name scope, the scope a SavedModel re-creates each variable
# under (`tf.Graph.name_scope`): a variable's name is its layer's name, then "/", then its own.
VALID_VARIABLE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")


def check_variable_names(variables, path):
    """Raises ValueError naming `path` and the first variables a SavedModel cannot hold.

    TensorFlow fails deep inside `tf.saved_model.save` on such a name (one starting with "_",
    or holding a space or ":"); this says which layer to rename before any file is written.
    """
    bad = [v.name.split(":")[0] for v in variables]
    bad = [name for name in bad if not VALID_VARIABLE_NAME.match(name)]
    if bad:
        shown = ", ".join(repr(name) for name in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ValueError(
            f"{path}: cannot export: {len(bad)} variable names are not valid SavedModel names "
            f"({shown}); a name must match {VALID_VARIABLE_NAME.pattern} (rename the layer that "
            "owns it)"
        )


def check_export_dir(path, force=False):
    """Refuses to overwrite an existing export unless `force`."""
    if os.path.exists(path) and os.listdir(path):
        if not force:
            raise FileExistsError(f"{path}: export directory exists and is not empty (use --force)")


def save_module(module, path, signatures, metadata, force=False, asset_files=()):
    """Saves `module`'s `signatures` to `path`, metadata as assets/tfmet_metadata.json, each
    {file name: array} of the module's `asset_arrays` (if any) as an .npy asset and a copy of
    each of `asset_files` under its own name.

    The SavedModel's root object holds the signatures, the variables they capture and the
    module's `saved_state()` ({name: tf.Variable or tf.Module}, the state tfmet reads back from
    an export, e.g. a recogniser's database), not the module itself: tf.saved_model.save traces
    again every tf.function it reaches from its root (the save's trace cache differs from the
    caller's), which for a recogniser was four more passes of the backbone's graph, 2/3 of the
    save's time and of saved_model.pb.

    The SavedModel is written to a temporary folder next to `path` and renamed into place, so a
    failed export never leaves a half-written model behind (nor destroys the previous one before
    the new one is complete).
    """
    path = os.path.abspath(os.fspath(path))
    check_export_dir(path, force)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(parent)  # what killed exports left behind
    staging = staging_directory(parent, "export")
    try:
        meta_file = os.path.join(staging, "tfmet_metadata.json")
        with open(meta_file, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
        root = tf.Module()
        for name, value in sorted(getattr(module, "saved_state", dict)().items()):
            setattr(root, name, value)
        root.metadata_asset = tf.saved_model.Asset(meta_file)
        array_assets = []
        for name, array in sorted(getattr(module, "asset_arrays", {}).items()):
            array_file = os.path.join(staging, name)
            np.save(array_file, np.asarray(array), allow_pickle=False)
            array_assets.append(tf.saved_model.Asset(array_file))
        if array_assets:
            root.array_assets = array_assets
        if asset_files:
            root.file_assets = [tf.saved_model.Asset(f) for f in asset_files]
        concrete = {name: _concrete(fn) for name, fn in signatures.items()}
        track_captured_variables(root, concrete.values())
        check_variable_names(root.captured_variables, path)
        target = os.path.join(staging, "model")
        tf.saved_model.save(root, target, signatures=concrete)
        replace_directory(target, path)
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
