"""Descriptor extraction: the Embedder, multi-scale extraction into descriptor stores
(`tfmet.data.descriptor_store`)."""

from tfmet.descriptors.chunk_files import merge_split
from tfmet.descriptors.embedder import MET_SCALES, DescriptorExtractor, Embedder, multiscale_embed
from tfmet.descriptors.extraction import extract_met, extract_split
from tfmet.descriptors.resize import resize, tf_bilinear_resize, torch_bilinear_resize
from tfmet.descriptors.spec import ExtractionSpec, build_extractor

__all__ = [
    "MET_SCALES",
    "DescriptorExtractor",
    "Embedder",
    "ExtractionSpec",
    "build_extractor",
    "extract_met",
    "extract_split",
    "merge_split",
    "multiscale_embed",
    "resize",
    "tf_bilinear_resize",
    "torch_bilinear_resize",
]
