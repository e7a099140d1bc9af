"""Reading the JSON files tfmet writes or takes, with errors that name the file."""

import json
import os

from tfmet.io.atomic import committed_path


def read_json(path, what="JSON file"):
    """Parses `path`; FileNotFoundError / ValueError name the file (`what` says what it is).

    A file of an output set committed but not yet rolled forward (a kill after the commit point,
    `tfmet.io.atomic.commit_files`) is read as committed.
    """
    path = os.fspath(path)
    source = committed_path(path)
    try:
        try:
            f = open(source, encoding="utf-8")
        except FileNotFoundError:
            if source == path:
                raise
            f = open(path, encoding="utf-8")  # rolled forward meanwhile: now in place
        with f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


def read_manifest(path, fmt, what):
    """A JSON object whose "format" is `fmt` (a file tfmet wrote), else ValueError."""
    manifest = read_json(path, what)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ValueError(f"{os.fspath(path)}: not a {what}")
    return manifest
