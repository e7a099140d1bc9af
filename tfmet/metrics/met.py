"""Renamed to `tfmet.metrics.recognition` (one file name per idea).

This name stays importable: it is the same module object.
"""

import sys

from tfmet.metrics import recognition as _module

sys.modules[__name__] = _module
