"""Moved to `tfmet.training.contrastive.augment`; this name stays importable (the same module)."""

import sys

from tfmet.training.contrastive import augment as _module

sys.modules[__name__] = _module
