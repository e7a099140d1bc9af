"""Answering visitors' photos with a recogniser export: the Python client, the database gallery,
the HTML report of tfmet-recognize and the web application of tfmet-serve (extra `[web]`)."""

from tfmet.serving.client import NOT_IN_COLLECTION, Answer, Recognizer
from tfmet.serving.gallery import Gallery
from tfmet.serving.uploads import BadImage, check_image

__all__ = [
    "NOT_IN_COLLECTION",
    "Answer",
    "BadImage",
    "Gallery",
    "Recognizer",
    "check_image",
    "open_recognizer",
]


def open_recognizer(model, info_dir=None, image_root=None, mini=False, names=None):
    """(Recognizer of the export `model`, Gallery of the Met ground truth or None).

    `image_root` defaults to the folder above `info_dir` (the Met dataset's layout); `names`: an
    exhibit names file (`tfmet.serving.gallery.read_exhibit_names`).
    """
    import os

    recognizer = Recognizer(model)
    if not info_dir:
        return recognizer, None
    root = image_root or os.path.dirname(os.path.abspath(info_dir))
    return recognizer, Gallery(info_dir, root, mini=mini, names=names)
