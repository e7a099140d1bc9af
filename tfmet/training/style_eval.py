"""Moved to `tfmet.training.style.evaluate`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import evaluate as _module

sys.modules[__name__] = _module
