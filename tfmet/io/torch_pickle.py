"""Unpickles the object pickle of a `torch.save` file: tensors and parameters rebuilt as numpy
arrays from their storages, without torch and without executing pickle code.

`CheckpointUnpickler` is a `tfmet.io.safe_pickle.RestrictedUnpickler` whose allow-list (built by
`_globals`) holds tensor/parameter rebuilding, storage types, dtypes, `collections.OrderedDict`,
numpy arrays and scalars and an inert stand-in for `argparse.Namespace` (`PickledNamespace`).
Storages are referenced by persistent id; their bytes are filled in by the container reader
(`tfmet.io.torch_checkpoint`: zip archive or legacy stream), after which `replace_pending` swaps
each rebuilt tensor into the object (bfloat16 widened to float32).
"""

import collections
import pickle

import numpy as np

from tfmet.io.safe_pickle import NUMPY_ARRAY_GLOBALS, RestrictedUnpickler, UnsafePickleError

__all__ = ["CheckpointUnpickler", "PickledNamespace", "replace_pending", "unpickle"]

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


class CheckpointUnpickler(RestrictedUnpickler):
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


def replace_pending(obj, memo=None):
    """Replaces every `_PendingTensor` in a nested structure by its numpy array (in place)."""
    memo = set() if memo is None else memo
    if id(obj) in memo:
        return obj
    if isinstance(obj, _PendingTensor):
        return obj.array
    if isinstance(obj, dict):
        memo.add(id(obj))
        for key, value in obj.items():
            obj[key] = replace_pending(value, memo)
        return obj
    if isinstance(obj, list):
        memo.add(id(obj))
        obj[:] = [replace_pending(v, memo) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(replace_pending(v, memo) for v in obj)
    if isinstance(obj, PickledNamespace):
        memo.add(id(obj))
        for key, value in vars(obj).items():
            setattr(obj, key, replace_pending(value, memo))
    return obj


def unpickle(stream, source, storages, legacy):
    unpickler = CheckpointUnpickler(stream, source, storages, legacy)
    try:
        obj = unpickler.load()
    except (UnsafePickleError, ValueError):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{source}: not a readable PyTorch checkpoint ({e})") from None
    return obj, unpickler.pending
