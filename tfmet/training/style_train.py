"""Moved to `tfmet.training.style.fit`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import fit as _module

sys.modules[__name__] = _module
