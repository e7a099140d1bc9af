"""Moved to `tfmet.training.style.predict`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import predict as _module

sys.modules[__name__] = _module
