"""Renamed to `tfmet.demo.figures` (one file name per idea).

This name stays importable: it is the same module object.
"""

import sys

from tfmet.demo import figures as _module

sys.modules[__name__] = _module
