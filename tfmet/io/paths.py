"""Keeping files named by untrusted lists below their root, links included.

A ground-truth list or an image tree names files relative to a root. Lexical checks (no "..", not
absolute) are not enough: a symbolic link inside the root, to a file or to a folder, can land
anywhere (another user's files, /dev/zero). `resolve_below` follows the links (os.path.realpath)
and refuses what lands outside the root's own real path.
"""

import os


def is_below(path, root):
    """True when `path` is `root` or inside it (both absolute, normalised; no links followed)."""
    return os.path.commonpath([path, root]) == root


class RootResolver:
    """Resolves paths below one root, caching the real path of each folder (one lstat per file).

    Args:
      root: the folder files must stay below (itself may be a link: its target is the root).
      what: how messages name the root, e.g. "the image root".
    """

    def __init__(self, root, what="the root"):
        self.root = os.fspath(root)
        self.real_root = os.path.realpath(self.root)
        self.what = what
        self._folders = {}

    def _real_folder(self, folder):
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return real

    def real_path(self, full):
        """os.path.realpath(`full`), with the folder part cached."""
        folder, name = os.path.split(full)
        candidate = os.path.join(self._real_folder(folder), name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def check(self, full, entry, where):
        """Raises ValueError naming `where` and `entry` unless `full` resolves below the root."""
        real = self.real_path(full)
        if not is_below(real, self.real_root):
            raise ValueError(
                f"{where}: {entry!r} resolves to {real} through a symbolic link, outside "
                f"{self.what} {self.real_root}"
            )
        return full
