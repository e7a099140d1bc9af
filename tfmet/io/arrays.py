"""Reading .npy files tfmet wrote or takes: errors name the file, and no file can make numpy
allocate more than the file holds (the declared shape is checked against the file's size)."""

import os

import numpy as np


def load_npy(path, what=".npy array", mmap=False):
    """`np.load(path)` (memory-mapped with `mmap`) with no pickles.

    Raises:
      FileNotFoundError: no such file.
      ValueError naming the file: not a .npy file (empty, truncated, bad header), an object
        array, or a declared shape whose data would not fit in the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} is not a regular file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read_header(f)
            data_bytes = size - f.tell()
        if dtype.hasobject:
            raise ValueError("holds Python objects")
        declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        if declared > data_bytes:
            raise ValueError(f"declares {shape} {dtype} ({declared} bytes), holds {data_bytes}")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable {what} ({e or type(e).__name__})") from None
