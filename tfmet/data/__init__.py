"""tfmet.data: Met ground truth (`met`) and image decoding / tf.data loading (`images`)."""

from tfmet.data.images import cap_max_side, decode_image, load_image, load_images, read_image
from tfmet.data.met import MetSplit, image_paths, load_split, resolve_image_path

__all__ = [
    "MetSplit",
    "cap_max_side",
    "decode_image",
    "image_paths",
    "load_image",
    "load_images",
    "load_split",
    "read_image",
    "resolve_image_path",
]
