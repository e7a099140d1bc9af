"""Moved to `tfmet.training.style.run`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import run as _module

sys.modules[__name__] = _module
