"""tfmet.data: Met ground truth (`met`), image decoding / tf.data loading (`images`, headers in
`image_headers`), contrastive pairs (`pairs`), style datasets (`style_datasets`, their splits
`style_splits` and tensors `style_images`), input limits (`limits`) and descriptor stores
(`descriptor_store`: numpy + JSON).

The package exports only what loads without TensorFlow: the ground-truth names of `met` (numpy
only), so a program can validate ground truth and fail fast on bad input before TensorFlow loads.
The image functions are imported from their module, `tfmet.data.images`.
"""

from tfmet.data.met import MetSplit, image_paths, load_split, resolve_image_path

__all__ = ["MetSplit", "image_paths", "load_split", "resolve_image_path"]
