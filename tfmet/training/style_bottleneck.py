"""Moved to `tfmet.training.style.bottleneck`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import bottleneck as _module

sys.modules[__name__] = _module
