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

Pickles are read with `tfmet.io.safe_pickle.RestrictedUnpickler`: only the globals of the
allow-list built by `_globals` resolve (tensor/parameter rebuilding, storage types, dtypes,
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

from tfmet.io.safe_pickle import NUMPY_ARRAY_GLOBALS, RestrictedUnpickler, UnsafePickleError

__all__ = [
    "MAGIC_NUMBER",
    "PickledNamespace",
    "UnsafePickleError",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict",
]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> numpy dtype of its elements. bfloat16 has no numpy dtype: its 16-bit
# patterns are kept as uint16 and widened to float32 when a tensor is rebuilt.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype name -> numpy dtype (dtypes are pickled as globals such as `torch.float32`;
# `_rebuild_tensor_v3` passes one explicitly for tensors on untyped storages).
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}


class _TorchGlobal:
    """Stand-in for a torch global naming a numpy dtype (never called): its `dtype`, and whether
    its bytes are bfloat16 (kept as uint16 until converted)."""

    table = {}
    bfloat16_name = None

    def __init__(self, name):
        self.name = name
        self.dtype = self.table[name]
        self.bfloat16 = name == self.bfloat16_name

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageType(_TorchGlobal):
    """A torch storage class such as `torch.FloatStorage`."""

    table = _STORAGE_DTYPES
    bfloat16_name = "BFloat16Storage"


class _TorchDtype(_TorchGlobal):
    """A torch dtype such as `torch.float32`."""

    table = _TORCH_DTYPES
    bfloat16_name = "bfloat16"


class _Storage:
    """A storage's raw bytes, filled in when they are read, and the dtype it was saved with."""

    def __init__(self, key, storage_type, numel):
        self.key = key
        self.storage_type = storage_type
        self.numel = int(numel)
        self.data = None  # np.uint8 buffer

    def elements(self, dtype, source):
        if self.data is None:
            raise ValueError(
                f"{source}: storage {self.key!r} is referenced but its data is missing"
            )
        usable = self.data.size - self.data.size % dtype.itemsize
        return self.data[:usable].view(dtype)


class PickledNamespace:
    """Inert stand-in for `argparse.Namespace` objects (training arguments saved with a model).

    Unpickling only sets attributes on it; nothing of the original class runs.
    """

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in sorted(self.__dict__.items()))
        return f"PickledNamespace({items})"


class _Marker:
    """A class global that only selects behaviour (`torch.Tensor`, `torch.nn.Parameter`)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


_TENSOR = _Marker("torch.Tensor")
_PARAMETER = _Marker("torch.nn.Parameter")


def _checked_size(size, what):
    if not isinstance(size, tuple | list) or not all(isinstance(s, int) for s in size):
        raise ValueError(f"tensor {what} must be a tuple of ints. Received: {size!r}")
    return tuple(int(s) for s in size)


def _as_numpy(storage, storage_offset, size, stride, tensor_dtype, source):
    """Numpy copy of the strided view (offset, size, stride in elements) of `storage`."""
    size = _checked_size(size, "size")
    stride = _checked_size(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"{source}: tensor size {size} and stride {stride} differ in rank")
    if not isinstance(storage, _Storage):
        raise ValueError(f"{source}: tensor rebuilt from a non-storage object {type(storage)}")
    dtype, bfloat16 = storage.storage_type.dtype, storage.storage_type.bfloat16
    if tensor_dtype is not None:
        dtype, bfloat16 = tensor_dtype.dtype, tensor_dtype.bfloat16
    elements = storage.elements(dtype, source)
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise ValueError(f"{source}: negative tensor size, stride or offset")
    if 0 in size:
        array = np.zeros(size, dtype)
    else:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= elements.size:
            raise ValueError(
                f"{source}: tensor of size {size} (stride {stride}, offset {storage_offset}) "
                f"reads past the end of storage {storage.key!r} ({elements.size} elements)"
            )
        array = np.lib.stride_tricks.as_strided(
            elements[storage_offset:],
            shape=size,
            strides=tuple(s * dtype.itemsize for s in stride),
            writeable=False,
        )
        array = np.array(array, copy=True)
    if bfloat16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


class _CheckpointUnpickler(RestrictedUnpickler):
    """Restricted unpickler that resolves torch's persistent storage ids to `_Storage` objects."""

    def __init__(self, file, source, storages, legacy):
        super().__init__(file, _globals(self), source=source, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy
        self.pending = []  # tensors are rebuilt once all storage bytes are known (legacy format)

    refusal = (
        "a weights checkpoint may only hold tensors, numbers, strings and containers (re-save "
        "it with torch.save(model.state_dict(), path))"
    )

    # Rebuild functions, bound to this unpickler so they know the source file.
    def rebuild_tensor(self, storage, storage_offset, size, stride, *unused):
        return self._defer(storage, storage_offset, size, stride, None)

    def rebuild_tensor_v3(
        self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, *unused
    ):
        if not isinstance(dtype, _TorchDtype):
            raise ValueError(f"{self._source}: _rebuild_tensor_v3 without a dtype ({dtype!r})")
        return self._defer(storage, storage_offset, size, stride, dtype)

    def rebuild_parameter(self, data, *unused):
        return data

    def rebuild_from_type(self, func, new_type, args, state):
        if new_type not in (_TENSOR, _PARAMETER):
            raise UnsafePickleError(f"{self._source}: tensor subclass {new_type!r} is not allowed")
        return func(*args)

    def _defer(self, storage, storage_offset, size, stride, dtype):
        tensor = _PendingTensor(storage, int(storage_offset), size, stride, dtype)
        self.pending.append(tensor)
        return tensor

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"{self._source}: unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafePickleError(
                f"{self._source}: persistent object of kind {kind!r} is not allowed (a pickled "
                "nn.Module? save model.state_dict() instead)"
            )
        if self._legacy:
            if len(pid) != 6:
                raise ValueError(f"{self._source}: malformed legacy storage id {pid!r}")
            _, storage_type, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise ValueError(f"{self._source}: malformed storage id {pid!r}")
            _, storage_type, key, _location, numel = pid
            view = None
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"{self._source}: storage of unknown type {storage_type!r}")
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type, numel)
        if view is not None:
            view_key, offset, view_size = view
            return _StorageView(storage, int(offset), int(view_size))
        return storage


class _StorageView:
    """A legacy storage view: `size` elements of `base` starting at `offset`."""

    def __init__(self, base, offset, size):
        self.base = base
        self.offset = offset
        self.size = size


class _PendingTensor:
    """A tensor whose storage bytes may not have been read yet."""

    def __init__(self, storage, storage_offset, size, stride, dtype):
        if isinstance(storage, _StorageView):
            storage_offset += storage.offset
            storage = storage.base
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = size
        self.stride = stride
        self.dtype = dtype
        self.array = None

    def materialise(self, source):
        self.array = _as_numpy(
            self.storage, self.storage_offset, self.size, self.stride, self.dtype, source
        )


def _globals(unpickler):
    allowed = dict(NUMPY_ARRAY_GLOBALS)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("argparse", "Namespace")] = PickledNamespace
    allowed[("torch", "Size")] = tuple
    allowed[("torch", "Tensor")] = _TENSOR
    allowed[("torch.nn.parameter", "Parameter")] = _PARAMETER
    for name in _STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = _TorchDtype(name)
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        allowed[("torch._utils", name)] = unpickler.rebuild_tensor
    allowed[("torch._utils", "_rebuild_tensor_v3")] = unpickler.rebuild_tensor_v3
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[("torch._utils", name)] = unpickler.rebuild_parameter
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = unpickler.rebuild_from_type
    return allowed


def _replace_pending(obj, memo=None):
    """Replaces every `_PendingTensor` in a nested structure by its numpy array (in place)."""
    memo = set() if memo is None else memo
    if id(obj) in memo:
        return obj
    if isinstance(obj, _PendingTensor):
        return obj.array
    if isinstance(obj, dict):
        memo.add(id(obj))
        for key, value in obj.items():
            obj[key] = _replace_pending(value, memo)
        return obj
    if isinstance(obj, list):
        memo.add(id(obj))
        obj[:] = [_replace_pending(v, memo) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(_replace_pending(v, memo) for v in obj)
    if isinstance(obj, PickledNamespace):
        memo.add(id(obj))
        for key, value in vars(obj).items():
            setattr(obj, key, _replace_pending(value, memo))
    return obj


def _unpickle(stream, source, storages, legacy):
    unpickler = _CheckpointUnpickler(stream, source, storages, legacy)
    try:
        obj = unpickler.load()
    except (UnsafePickleError, ValueError):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{source}: not a readable PyTorch checkpoint ({e})") from None
    return obj, unpickler.pending


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
    obj, pending = _unpickle(io.BytesIO(archive.read(record)), path, storages, legacy=False)
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
            return _CheckpointUnpickler(stream, path, storages, legacy=True).load()
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
    obj, pending = _unpickle(stream, path, storages, legacy=True)
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
    return _replace_pending(obj)


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
