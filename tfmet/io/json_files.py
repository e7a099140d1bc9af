"""Reading the JSON files tfmet writes or takes, with errors that name the file."""

import json
import os


def read_json(path, what="JSON file"):
    """Parses `path`; FileNotFoundError / ValueError name the file (`what` says what it is)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
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
