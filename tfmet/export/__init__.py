"""SavedModel export: descriptor, style classifier and one-piece recogniser modules."""

from tfmet.export.common import metadata_signature, save_module
from tfmet.export.descriptor import DescriptorModule
from tfmet.export.knn import knn_confidence
from tfmet.export.recognizer import RecognizerModule

__all__ = [
    "DescriptorModule",
    "RecognizerModule",
    "knn_confidence",
    "metadata_signature",
    "save_module",
]
