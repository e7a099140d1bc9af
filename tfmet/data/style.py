"""Renamed to `tfmet.data.style_datasets` (one file name per idea).

This name stays importable: it is the same module object.
"""

import sys

from tfmet.data import style_datasets as _module

sys.modules[__name__] = _module
