"""SavedModel export: descriptor, style classifier and one-piece recogniser modules."""

from tfmet.export.builders import (
    build_descriptor,
    build_recognizer,
    build_style,
    classifier_settings,
    scann_config,
    threshold_settings,
)
from tfmet.export.common import metadata_signature, save_module
from tfmet.export.descriptor import DescriptorModule
from tfmet.export.recognizer import RecognizerModule

__all__ = [
    "build_descriptor",
    "build_recognizer",
    "build_style",
    "classifier_settings",
    "scann_config",
    "threshold_settings",
    "DescriptorModule",
    "RecognizerModule",
    "metadata_signature",
    "save_module",
]
