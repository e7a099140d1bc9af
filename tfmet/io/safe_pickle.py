"""Restricted unpickling: rebuild numpy arrays (and plain containers) and refuse everything else.

Pickle can execute arbitrary code through `__reduce__`; `restricted_load` only resolves the globals
in an allow-list, so a malicious file fails with `UnsafePickleError` before anything runs.
"""

import io
import os
import pickle

import numpy as np

# (module, name) -> object. numpy 1.x pickles name `numpy.core.*`, numpy 2.x `numpy._core.*`.
NUMPY_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    # Protocol 5 rebuilds arrays from an in-band buffer.
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Protocol-2 pickles store bytes as latin-1 text decoded through codecs.encode.
    ("_codecs", "encode"): __import__("codecs").encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` only returns allow-listed globals."""

    def __init__(self, file, allowed, source="<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._source = source

    refusal = "only numpy arrays and plain containers are allowed in this file"

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}': {self.refusal}"
            ) from None


def _declared_bytes(shape, dtype):
    count = 1
    for side in shape if isinstance(shape, tuple | list) else (shape,):
        if not isinstance(side, int) or side < 0:
            return None
        count *= side
    try:
        return count * np.dtype(dtype).itemsize
    except TypeError:
        return None


def sized_numpy_globals(limit):
    """`NUMPY_ARRAY_GLOBALS` whose array constructors refuse to allocate more than `limit`
    bytes: an array's data comes from the file, so a declared size beyond the file's is a lie
    that would otherwise allocate (or fail to allocate) terabytes."""

    def check(shape, dtype):
        size = _declared_bytes(shape, dtype)
        if size is None or size > limit:
            raise ValueError(
                f"declares an array of shape {shape} ({dtype}), more than the "
                f"{limit}-byte file can hold"
            )

    def ndarray(shape, dtype=float, *args, **kwargs):
        check(shape, dtype)
        return np.ndarray(shape, dtype, *args, **kwargs)

    def reconstruct(subtype, shape, dtype):
        check(shape, np.uint8)
        return np._core.multiarray._reconstruct(
            np.ndarray if subtype is ndarray else subtype, shape, dtype
        )

    allowed = dict(NUMPY_ARRAY_GLOBALS)
    allowed[("numpy", "ndarray")] = ndarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    return allowed


def restricted_load(file, allowed=None, source=None):
    """Unpickles `file` (an open binary file) allowing only `allowed` globals (numpy by default,
    with array sizes bounded by the file's size)."""
    source = str(source or getattr(file, "name", "<pickle>"))
    if allowed is None:
        try:
            limit = os.fstat(file.fileno()).st_size
        except (AttributeError, OSError, io.UnsupportedOperation):
            limit = len(file.getbuffer()) if hasattr(file, "getbuffer") else 2**40
        allowed = sized_numpy_globals(limit + 4096)
    return RestrictedUnpickler(file, allowed, source=source).load()


def load_reference_descriptors(path):
    """Reads the Met reference's `descriptors.pkl` safely.

    Returns:
      dict with the keys the file has among `train_descriptors`, `val_descriptors`,
      `test_descriptors`, each a float32 array [n, d].

    Raises:
      UnsafePickleError: the file references anything but numpy array reconstruction.
      ValueError: the file is not a dict of 2-D arrays, naming the file and the key.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = restricted_load(f, source=path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError) as e:
        raise ValueError(f"{path}: not a readable descriptors pickle ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of arrays, found {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if not isinstance(value, np.ndarray) or value.ndim != 2:
            raise ValueError(f"{path}: entry {key!r} is not a 2-D array")
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out
