"""tfmet.data: Met ground truth (`met`) and image decoding / tf.data loading (`images`).

`tfmet.data.met` needs only numpy; the image functions import TensorFlow on first use, so a
program can validate ground truth (and fail fast on bad input) before TensorFlow loads.
"""

from tfmet.io.lazy import lazy_exports

_EXPORTS = {
    "MetSplit": "met",
    "image_paths": "met",
    "load_split": "met",
    "resolve_image_path": "met",
    "ImageRefused": "images",
    "cap_max_side": "images",
    "declared_pixels": "images",
    "declared_size": "images",
    "decode_image": "images",
    "load_image": "images",
    "load_images": "images",
    "read_image": "images",
    "read_image_bytes": "images",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
