"""Command-line programs (absl). Each module is thin: flags, then calls into the library.

Shared pieces (one UsageError, one way to fail, one way to run `main`) are in `tfmet.cli.common`.

Importing this package silences TensorFlow's C++ start-up logging (the CUDA-init error printed on
machines without a GPU is harmless); set TF_CPP_MIN_LOG_LEVEL yourself to see it again.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tfmet.cli.common import UsageError, fail  # noqa: E402

__all__ = ["UsageError", "fail"]
