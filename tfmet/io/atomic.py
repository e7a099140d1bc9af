"""Atomic writes, so that a kill at any instant leaves either the old output or the new one.

- A file goes to a temporary file in the same folder, is fsynced, then renamed (`atomic_path`).
- A directory is built aside, then swapped in (`replace_directory`).
- A set of files (and folders) that belong together is written aside, then committed through a
  journal (`commit_files`): the journal is the commit point, and a kill after it is rolled
  forward by `recover_commits` at the next start.
- Temporaries are named `.tmp-<pid>-...`: `clean_stale_temporaries` removes those of processes
  that no longer run (left by a kill), never those of a run in progress.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

TMP = ".tmp-"
JOURNAL = ".tfmet-commit-"  # `.tfmet-commit-<set>.json`: renames still to do for a set


def temporary_prefix(name=""):
    """`.tmp-<pid>-<name>-`: the prefix of this process's temporaries."""
    return f"{TMP}{os.getpid()}-" + (f"{name}-" if name else "")


def staging_directory(parent, name=""):
    """A new empty folder `<parent>/.tmp-<pid>-<name>-XXXX` to build an output in."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=temporary_prefix(name), dir=parent)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_OWNED = re.compile(re.escape(TMP) + r"(\d+)-")


def clean_stale_temporaries(directory):
    """Removes `.tmp-<pid>-*` files and folders in `directory` whose process is gone.

    Returns the removed names. Commits in progress are rolled forward first
    (`recover_commits`), so no temporary a journal still needs is removed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    recover_commits(directory)
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _OWNED.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; on success it is renamed onto `path`.

    On error the temporary file is removed and `path` is left as it was. An OSError that names
    no file (a full disk's ENOSPC from a write or fsync) is raised again naming `path`, so the
    one-line error says which output could not be written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=temporary_prefix(), suffix="-" + os.path.basename(path), dir=directory
    )
    os.close(fd)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, path) from e
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


def commit_files(directory, name, moves):
    """Moves finished temporaries onto their targets as one set.

    Args:
      directory: the folder holding every temporary and target.
      name: the set's name (one journal per set, `.tfmet-commit-<name>.json`).
      moves: [(temporary, target)]: a temporary may be a folder (it replaces the target folder
        through `replace_directory`); each temporary must be on the target's file system (next
        to it); a temporary of None deletes the target (an output the new set does not have).

    The journal listing the moves is written atomically first: before it exists, the old set
    stands; once it exists, the new set is committed and every move is carried out, now or,
    after a kill, by `recover_commits` at the next start.
    """
    directory = os.fspath(directory)
    journal = os.path.join(directory, f"{JOURNAL}{name}.json")
    entries = [
        [None if t is None else os.path.relpath(t, directory), os.path.relpath(d, directory)]
        for t, d in moves
    ]
    save_json(journal, {"moves": entries})
    _roll_forward(directory, journal)


def _roll_forward(directory, journal):
    with open(journal, encoding="utf-8") as f:
        moves = json.load(f)["moves"]
    for temporary, target in moves:
        target = os.path.join(directory, target)
        if temporary is None:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
            continue
        temporary = os.path.join(directory, temporary)
        if not os.path.exists(temporary):
            continue  # moved before a kill
        if os.path.isdir(temporary):
            replace_directory(temporary, target)
        else:
            os.replace(temporary, target)
    os.remove(journal)


def committed_path(path):
    """Where `path`'s committed contents are, for a reader that must not wait for a restart.

    A kill after a `commit_files` commit point leaves the new set's files beside their targets
    until `recover_commits` runs at the next start in that folder; a reader in between would see
    the old file. This returns the temporary that a pending journal moves onto `path` (the
    committed file) if it is still there, else `path`; a pending deletion of `path` gives
    FileNotFoundError. Nothing is moved: readers never race a writer's roll-forward.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    try:
        journals = [n for n in os.listdir(directory) if n.startswith(JOURNAL)]
    except OSError:
        return path
    for journal in sorted(journals):
        try:
            with open(os.path.join(directory, journal), encoding="utf-8") as f:
                moves = json.load(f)["moves"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # finished (removed) meanwhile, or not a journal of ours
        for temporary, target in moves:
            if os.path.normpath(os.path.join(directory, target)) != os.path.join(directory, name):
                continue
            if temporary is None:
                raise FileNotFoundError(f"{path}: removed by a committed output set ({journal})")
            temporary = os.path.join(directory, temporary)
            if os.path.isfile(temporary):
                return temporary
    return path


def recover_commits(directory):
    """Finishes the `commit_files` sets a kill interrupted in `directory`; returns their names."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    done = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(JOURNAL) and name.endswith(".json"):
            _roll_forward(directory, os.path.join(directory, name))
            done.append(name[len(JOURNAL) : -len(".json")])
    return done
