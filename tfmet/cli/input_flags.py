"""The input-limit flags shared by the programs that read images: --max_pixels, --max_bytes.

Defined once (`tfmet.cli.settings.INPUT`) and generated here (absl refuses a flag defined twice
in one process). Defaults and why: `tfmet.data.limits`.
"""

from tfmet.cli import settings
from tfmet.cli.common import UsageError

settings.define_flags(settings.INPUT, __name__)

NAMES = settings.names(settings.INPUT)


def check(values):
    """Raises UsageError unless the limits in `values` (a dict with `NAMES`) are positive."""
    for name in NAMES:
        if values[name] is None or int(values[name]) < 1:
            raise UsageError(f"--{name} must be a positive integer. Received: {values[name]}")
