"""Opening SavedModels that tfmet exported, with errors that name the folder and the problem."""

import os


def load_saved_model(path):
    """`tf.saved_model.load(path)`; a folder that is not a complete SavedModel (missing or
    truncated saved_model.pb, missing variables) raises ValueError naming it."""
    import tensorflow as tf

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such SavedModel folder")
    try:
        return tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(
            f"{path}: not a loadable SavedModel ({type(e).__name__}: {reason})"
        ) from None


def signature(loaded, path, name):
    """The signature `name` of a loaded SavedModel, or ValueError naming `path`."""
    function = loaded.signatures.get(name)
    if function is None:
        raise ValueError(
            f"{path}: the SavedModel has no {name!r} signature (has {sorted(loaded.signatures)})"
        )
    return function


def load_keras_file(path, what="Keras model", safe_mode=True):
    """`keras.saving.load_model(path)` whose failures are one ValueError naming the file.

    Keras reports an unregistered class with the whole model config (tens of KB) and a broken
    archive with a zipfile traceback; both become `<path>: not a loadable <what> (<reason>)`,
    the reason cut to its first 200 characters. Safe mode's refusal of a file that would run
    code keeps its own message (callers may offer their "trust" option).
    """
    import keras

    path = os.fspath(path)
    try:
        return keras.saving.load_model(path, safe_mode=safe_mode)
    except Exception as e:
        reason = " ".join(str(e).split())
        if "safe mode" in reason or "safe_mode" in reason:
            raise ValueError(
                f"{path}: the file would run code when loaded (Keras safe mode refused it)"
            ) from None
        if len(reason) > 200:
            reason = reason[:200] + "..."
        raise ValueError(f"{path}: not a loadable {what} ({type(e).__name__}: {reason})") from None
