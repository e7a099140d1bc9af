"""Checks that output paths can be written, made before the work whose results they will hold."""

import os


def _nearest_existing(path):
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(path, what):
    """Raises ValueError naming `what` (e.g. "--output_dir") when `path` cannot be a folder the
    program writes in: it exists and is not a folder, a parent is a file, or no write access."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}={path}: exists and is not a folder")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}={path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={path}: no permission to write in {existing}")
    return path


def check_output_file(path, what):
    """Raises ValueError naming `what` when `path` cannot be written as a file: it is a folder,
    or its folder cannot be (created and) written."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what}={path}: is a folder, not a file")
    check_output_dir(os.path.dirname(path), what)
    return path
