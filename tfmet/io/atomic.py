"""Atomic writes: a file goes to a temporary file in the same folder, is fsynced, then renamed;
a directory is built aside, then swapped in (`replace_directory`)."""

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; on success it is renamed onto `path`.

    On error the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path, array):
    """Writes `array` as a .npy file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)


def save_json(path, obj):
    """Writes `obj` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")


ASIDE = ".old-"  # `<target>.old-<random>`: a replaced directory while its successor moves in


def _aside_copies(target):
    parent, name = os.path.split(os.path.abspath(target))
    prefix = name + ASIDE
    return [os.path.join(parent, n) for n in os.listdir(parent or ".") if n.startswith(prefix)]


def recover_directory(target):
    """Undoes a `replace_directory` that was killed between its two renames.

    If `target` is missing and an old copy stands aside, it is moved back; stale aside copies
    next to an existing `target` are removed. Returns `target`.
    """
    target = os.path.abspath(os.fspath(target))
    if not os.path.isdir(os.path.dirname(target)):
        return target
    aside = _aside_copies(target)
    if aside and not os.path.exists(target):
        os.replace(aside.pop(), target)
    for path in aside:
        shutil.rmtree(path, ignore_errors=True)
    return target


def replace_directory(new, target):
    """Moves the finished directory `new` onto `target` (same file system), replacing it.

    The old `target` is first renamed aside, then `new` renamed in, then the old one deleted: a
    kill at any instant leaves the old set or the new one, never neither (a kill between the two
    renames leaves the old one aside, and the next `replace_directory` or `recover_directory`
    puts it back). Never a half-deleted directory.
    """
    target = recover_directory(target)
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=os.path.basename(target) + ASIDE, dir=os.path.dirname(target))
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
