"""Moved to `tfmet.training.contrastive.mining`; this name stays importable (the same module)."""

import sys

from tfmet.training.contrastive import mining as _module

sys.modules[__name__] = _module
