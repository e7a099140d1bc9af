"""Command-line programs (absl). Each module is thin: flags, then calls into the library.

Importing this package silences TensorFlow's C++ start-up logging (the CUDA-init error printed on
machines without a GPU is harmless); set TF_CPP_MIN_LOG_LEVEL yourself to see it again.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def fail(program, message):
    """Bad input: one line `<program>: error: <message>` on stderr, exit status 2."""
    import sys

    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)
