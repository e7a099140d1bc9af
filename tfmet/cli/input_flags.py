"""The input-limit flags shared by the programs that read images: --max_pixels, --max_bytes.

Defined once, here (absl refuses a flag defined twice in one process). Defaults and why:
`tfmet.data.limits`.
"""

from absl import flags

from tfmet.cli.common import UsageError
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

flags.DEFINE_integer(
    "max_pixels",
    DEFAULT_MAX_PIXELS,
    "Refuse (as an invalid row) images whose header declares more pixels, before decoding.",
)
flags.DEFINE_integer(
    "max_bytes", DEFAULT_MAX_BYTES, "Refuse (as an invalid row) image files of more bytes."
)

NAMES = ("max_pixels", "max_bytes")


def check(values):
    """Raises UsageError unless the limits in `values` (a dict with `NAMES`) are positive."""
    for name in NAMES:
        if values[name] is None or int(values[name]) < 1:
            raise UsageError(f"--{name} must be a positive integer. Received: {values[name]}")
