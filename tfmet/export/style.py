"""Renamed to `tfmet.export.style_classifier` (one file name per idea).

This name stays importable: it is the same module object.
"""

import sys

from tfmet.export import style_classifier as _module

sys.modules[__name__] = _module
