"""Reads PyTorch checkpoints (`.pth`, `.pt`, `.pth.tar`) into numpy without torch and without
executing pickle code.

Both on-disk formats of `torch.save` are supported:

* zip archives (torch >= 1.6): `<prefix>/data.pkl` is a pickle whose tensors refer, through
  persistent ids `('storage', storage_type, key, location, numel)`, to raw little-endian storages
  stored uncompressed as `<prefix>/data/<key>`;
* the legacy stream (torch < 1.6, or `_use_new_zipfile_serialization=False`): pickled magic
  number 0x1950a86a20f9469cfc6c, protocol version 1001 and a sys-info dict, then the object
  pickle (persistent ids `('storage', storage_type, root_key, location, numel, view_metadata)`),
  then the pickled list of storage keys, then each storage as an int64 element count followed by
  its raw bytes.

Pickles are read with `tfmet.io.torch_pickle.CheckpointUnpickler`, a restricted unpickler: only
the globals of its allow-list resolve (tensor/parameter rebuilding, storage types, dtypes,
`collections.OrderedDict`, numpy arrays and scalars, an inert stand-in for `argparse.Namespace`).
Anything else - a pickled module, `os.system` through `__reduce__` - raises `UnsafePickleError`
before it can run. Tensors come back as numpy arrays with their dtype, shape, strides and storage
offset applied (bfloat16 is widened to float32).
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from tfmet.io.safe_pickle import UnsafePickleError
from tfmet.io.torch_pickle import CheckpointUnpickler, replace_pending, unpickle

__all__ = [
    "MAGIC_NUMBER",
    "UnsafePickleError",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict",
]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


def _load_zip(path, archive):
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if any(n.endswith("constants.pkl") for n in names):
        raise ValueError(
            f"{path}: a TorchScript archive, not a checkpoint: save model.state_dict() with "
            "torch.save instead"
        )
    if not pickles:
        raise ValueError(f"{path}: zip archive without data.pkl: not a PyTorch checkpoint")
    record = min(pickles, key=len)
    prefix = record[: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    storages = {}
    obj, pending = unpickle(io.BytesIO(archive.read(record)), path, storages, legacy=False)
    for key, storage in storages.items():
        entry = f"{prefix}data/{key}"
        try:
            raw = archive.read(entry)
        except KeyError:
            raise ValueError(f"{path}: storage record {entry!r} is missing") from None
        storage.data = _to_native(np.frombuffer(raw, np.uint8), storage, byteorder)
    return obj, pending


def _to_native(buffer, storage, byteorder):
    """Byte-swaps a big-endian storage buffer to native (little-endian) order."""
    itemsize = storage.storage_type.dtype.itemsize
    if byteorder == "little" or itemsize == 1:
        return buffer
    usable = buffer.size - buffer.size % itemsize
    swapped = buffer[:usable].reshape(-1, itemsize)[:, ::-1].reshape(-1)
    return np.ascontiguousarray(swapped)


def _load_legacy(path, stream):
    storages = {}

    def header(what):
        try:
            return CheckpointUnpickler(stream, path, storages, legacy=True).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad {what}: {e})") from None

    if header("magic number") != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
    version = header("protocol version")
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported legacy checkpoint protocol {version!r}")
    sys_info = header("system info")
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    obj, pending = unpickle(stream, path, storages, legacy=True)
    keys = header("storage key list")
    if not isinstance(keys, list):
        raise ValueError(f"{path}: storage key list is a {type(keys).__name__}")
    order = "<" if little else ">"
    for key in keys:
        key = str(key)
        storage = storages.get(key)
        if storage is None:
            raise ValueError(f"{path}: storage {key!r} listed but never referenced")
        head = stream.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: truncated before storage {key!r}")
        (numel,) = struct.unpack(order + "q", head)
        nbytes = numel * storage.storage_type.dtype.itemsize
        if numel < 0 or numel != storage.numel:
            raise ValueError(
                f"{path}: storage {key!r} holds {numel} elements, the pickle says {storage.numel}"
            )
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated inside storage {key!r}")
        buffer = np.frombuffer(raw, np.uint8)
        storage.data = _to_native(buffer, storage, "little" if little else "big")
    return obj, pending


def load_checkpoint(path):
    """Reads a `torch.save` file into plain Python containers with numpy arrays for tensors.

    Args:
      path: a `.pth`/`.pt`/`.pth.tar` file written by `torch.save` (zip or legacy format).

    Returns:
      The saved object: dicts (OrderedDict for state dicts), lists, tuples, numbers, strings,
      numpy arrays in place of tensors and parameters, `PickledNamespace` for argparse namespaces.

    Raises:
      FileNotFoundError: `path` does not exist.
      UnsafePickleError: the file references a global outside the allow-list (e.g. a pickled
        module or code); nothing from it is executed.
      ValueError: the file is not a readable torch checkpoint, naming the file and the problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            obj, pending = _load_zip(path, archive)
    else:
        with open(path, "rb") as stream:
            start = stream.read(1)
            if start != b"\x80":
                raise ValueError(
                    f"{path}: neither a zip archive nor a pickle stream: not a PyTorch checkpoint"
                )
            stream.seek(0)
            obj, pending = _load_legacy(path, stream)
    for tensor in pending:
        tensor.materialise(path)
    return replace_pending(obj)


_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")


def _is_state_dict(obj):
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, np.ndarray) for v in obj.values())
    )


def extract_state_dict(obj, source="<checkpoint>", key=None, strip_prefixes=("module.",)):
    """Finds the state dict in a loaded checkpoint and strips DataParallel prefixes.

    Args:
      obj: what `load_checkpoint` returned.
      source: the file name, for error messages.
      key: the entry holding the state dict (e.g. "state_dict"); None searches `state_dict`,
        `model`, `model_state_dict`, `module`, `net`, `network`, nested at any depth.
      strip_prefixes: prefixes removed from every name when all names carry them.

    Returns:
      OrderedDict name -> numpy array.

    Raises:
      ValueError: no state dict was found, listing the top-level keys.
    """
    found = obj
    if key is not None:
        for part in key.split("/"):
            if not isinstance(found, dict) or part not in found:
                raise ValueError(f"{source}: no entry {key!r} in the checkpoint")
            found = found[part]
    else:
        for _ in range(4):
            if _is_state_dict(found) or not isinstance(found, dict):
                break
            nested = [k for k in _NESTED_KEYS if isinstance(found.get(k), dict)]
            if not nested:
                break
            found = found[nested[0]]
    if not isinstance(found, dict):
        raise ValueError(f"{source}: expected a state dict, found {type(found).__name__}")
    tensors = collections.OrderedDict(
        (k, v) for k, v in found.items() if isinstance(k, str) and isinstance(v, np.ndarray)
    )
    if not tensors:
        top = ", ".join(repr(k) for k in list(found)[:10])
        raise ValueError(f"{source}: no tensors found in the checkpoint (top-level keys: {top})")
    for prefix in strip_prefixes:
        while tensors and all(k.startswith(prefix) for k in tensors):
            tensors = collections.OrderedDict((k[len(prefix) :], v) for k, v in tensors.items())
    return tensors


def load_state_dict(path, key=None):
    """`extract_state_dict(load_checkpoint(path))`: name -> numpy array, `module.` stripped."""
    return extract_state_dict(load_checkpoint(path), source=os.fspath(path), key=key)
