"""Moved to `tfmet.training.style.finetune`; this name stays importable (the same module)."""

import sys

from tfmet.training.style import finetune as _module

sys.modules[__name__] = _module
