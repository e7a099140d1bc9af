"""Answering visitors' photos with a recogniser export: the Python client, the database gallery,
the HTML report of tfmet-recognize and the web application of tfmet-serve (extra `[web]`)."""

from tfmet.serving.client import NOT_IN_COLLECTION, Answer, Recognizer
from tfmet.serving.gallery import Gallery
from tfmet.serving.uploads import BadImage, check_image

__all__ = ["NOT_IN_COLLECTION", "Answer", "BadImage", "Gallery", "Recognizer", "check_image"]
