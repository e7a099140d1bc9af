"""What both trainings do with their run directory: record the config, refuse a resume that
would change what is computed (one rule), report progress, write TensorBoard scalars.

The rule: a run records its config (`config.json`) when it starts; a resumed run's config must
equal the recorded one in every entry (nested entries compared by their dotted path, e.g.
`train.epochs`) except the training's `RESUMABLE_CHANGES`, which only extend a run or change how
it reports (e.g. the number of epochs).
"""

import difflib
import json
import os
import time

from absl import logging

from tfmet.io.json_files import read_json
from tfmet.io.progress import format_seconds

CONFIG_FILE = "config.json"


def config_record(config):
    """A ConfigDict (or dict) as plain JSON-able nested dicts (tuples become lists)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=list))


def flatten(record, prefix=""):
    """{dotted key: value} of a nested dict."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Entries added after runs were first recorded, with the value those runs had: a record without
# one reads as if it held that value.
ADDED_ENTRIES = {"precision": "float32", "model.precision": "float32"}


def resume_differences(recorded, record, resumable):
    """Sorted dotted keys whose values differ between two config records, less `resumable`."""
    recorded, record = flatten(recorded), flatten(record)
    recorded = {k: v for k, v in ADDED_ENTRIES.items() if k in record} | recorded
    return sorted(
        key
        for key in set(recorded) | set(record)
        if key not in resumable and recorded.get(key) != record.get(key)
    )


def check_resume(path, record, resumable):
    """Raises ValueError naming `path` and every entry a resumed run may not change."""
    if not os.path.exists(path):
        return
    recorded = read_json(path, "recorded run config")
    differences = resume_differences(recorded, record, resumable)
    if differences:
        flat_old, flat_new = flatten(recorded), flatten(record)
        details = "; ".join(
            f"{k}: {flat_old.get(k)!r} recorded, {flat_new.get(k)!r} now" for k in differences
        )
        raise ValueError(
            f"{path}: cannot resume with a different setup ({details}); only "
            f"{', '.join(sorted(resumable))} may change when resuming"
        )


class Progress:
    """Logs progress (items/s, ETA) of long work at most every `interval` seconds."""

    def __init__(self, what, total, unit="items", interval=30.0):
        self.what = what
        self.total = total
        self.unit = unit
        self.interval = interval
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done, message=""):
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.interval and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        logging.info(
            "%s: %d/%d %s, %.1f %s/s, ETA %s %s",
            self.what,
            done,
            self.total,
            self.unit,
            rate,
            self.unit,
            format_seconds(eta),
            message,
        )


def write_scalars(writer, step, values):
    """One TensorBoard scalar per entry of `values` at `step`, then flush."""
    # Imported here, not at the top: config files import this module for `check_entries`, and a
    # program refuses a bad one without loading TensorFlow (tfmet-train-style: 2.1 s, was 5.0 s).
    import tensorflow as tf

    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.scalar(name, value)
    writer.flush()


def _plain(config):
    return config.to_dict() if hasattr(config, "to_dict") else config


def check_entries(config, reference, what="config"):
    """Raises ValueError for an entry of `config` that `reference` (the defaults) does not have,
    or whose type differs from the default's: a typo such as `c.train.epoks = 3` in a config
    file is refused (naming the closest known entry) instead of training with the default.

    Types: a bool entry takes bools, an int entry ints, a float entry ints or floats, a string
    entry strings, a tuple/list entry tuples or lists; entries whose default is None take any
    value (they are checked where they are used).
    """
    _check_section(_plain(config), _plain(reference), what, "")


def _check_section(config, reference, what, prefix):
    if not isinstance(config, dict):
        raise ValueError(f"{what} entry `{prefix[:-1]}` must be a section. Received: {config!r}")
    for key, value in config.items():
        name = prefix + str(key)
        if key not in reference:
            close = difflib.get_close_matches(str(key), list(map(str, reference)), n=1)
            hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
            raise ValueError(f"{what} has no entry `{name}`{hint}")
        default = reference[key]
        if isinstance(default, dict):
            _check_section(value, default, what, name + ".")
        elif not _same_kind(value, default):
            raise ValueError(f"{what} entry `{name}` must be {_kind(default)}. Received: {value!r}")


def _kind(value):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, tuple | list) else type(value).__name__
    )


def _same_kind(value, default):
    if default is None or value is None and default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))
