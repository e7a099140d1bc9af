"""Descriptor SavedModel: encoded images or image tensors -> (whitened) global descriptors."""

import numpy as np
import tensorflow as tf

from tfmet.data.images import DEFAULT_MAX_PIXELS
from tfmet.data.limits import DEFAULT_MAX_BYTES
from tfmet.descriptors.embedder import MET_SCALES, DescriptorExtractor
from tfmet.export.common import map_image_bytes
from tfmet.layers import l2_normalize

IMAGE_BYTES_SPEC = tf.TensorSpec([None], tf.string, name="image_bytes")
IMAGES_SPEC = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


class DescriptorModule(tf.Module):
    """Serves `Embedder` descriptors, multi-scale or single-scale, with optional PCA-whitening.

    Signatures (see `signatures()`): `serving_default` takes `image_bytes` (string [N], any mix
    of sizes and formats) and returns `descriptor` (float32 [N, D]) and `valid` (bool [N]; rows of
    undecodable images, and of images declaring more than `max_pixels` pixels, are zero and
    invalid); `images` takes float32 RGB `images` [N, H, W, 3] in
    [0, 255] (one size per batch) and returns `descriptor`.

    Args:
      embedder: a built or unbuilt `Embedder`.
      scales: scales averaged per image (`MET_SCALES`, or (1.0,) for single-scale).
      resize_method: "torch" or "tf" (see `tfmet.descriptors.resize`).
      pca: None, or the PCA-whitening to bake in, (mean [D], projection P [D, dim]):
        descriptor = L2((d - mean) P).
      max_side: optional cap on the long side of decoded images (no cap by default).
      max_pixels: images whose header declares more pixels are invalid rows, never decoded
        (default Pillow's 89,478,485; None: no limit).
      max_bytes: images of more bytes are invalid rows (default 64 MiB, as tfmet-extract;
        None: no limit).
      local: None, or a `tfmet.descriptors.local.LocalSpec`: the extractor also computes local
        features from the same backbone passes (the subclasses' local signatures use them).
    """

    def __init__(
        self,
        embedder,
        scales=MET_SCALES,
        resize_method="torch",
        pca=None,
        max_side=None,
        name=None,
        max_pixels=DEFAULT_MAX_PIXELS,
        max_bytes=DEFAULT_MAX_BYTES,
        local=None,
    ):
        super().__init__(name=name)
        self.extractor = DescriptorExtractor(embedder, scales, resize_method, local=local)
        self.local = local
        self.local_dim = None if local is None else int(self.extractor.local_dim)
        self.embedder = embedder
        self.max_side = max_side
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.whitened = pca is not None
        in_dim = embedder.output_dim
        if self.whitened:
            pca_mean, pca_projection = (np.asarray(a, np.float32) for a in pca)
            if (
                pca_mean.shape != (in_dim,)
                or pca_projection.ndim != 2
                or (pca_projection.shape[0] != in_dim)
            ):
                raise ValueError(
                    f"`pca` must be (mean [{in_dim}], projection [{in_dim}, dim]). Received: "
                    f"shapes {pca_mean.shape}, {pca_projection.shape}"
                )
            self.pca_mean = tf.Variable(pca_mean, trainable=False, name="pca_mean")
            self.pca_projection = tf.Variable(
                pca_projection, trainable=False, name="pca_projection"
            )
        self.dim = int(self.pca_projection.shape[1]) if self.whitened else int(in_dim)
        self.describe_images = tf.function(self._describe_images, input_signature=[IMAGES_SPEC])
        self.describe_bytes = tf.function(self._describe_bytes, input_signature=[IMAGE_BYTES_SPEC])

    def descriptors(self, images):
        """Descriptors [N, D] of a batch of same-size float images in [0, 255]."""
        return self.whiten(self.extractor._extract(images))

    def whiten(self, descriptor):
        """The export's PCA-whitening of global descriptors [N, D] (identity without one)."""
        if self.whitened:
            descriptor = l2_normalize(tf.matmul(descriptor - self.pca_mean, self.pca_projection))
        return descriptor

    def _describe_images(self, images):
        return {"descriptor": self.descriptors(images)}

    def _bytes_descriptors(self, image_bytes):
        """(descriptors [N, dim], valid [N]) of encoded images, one at a time (any size)."""
        return map_image_bytes(
            image_bytes,
            lambda x: self.descriptors(x)[0],
            [self.dim],
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
        )

    def _describe_bytes(self, image_bytes):
        descriptor, valid = self._bytes_descriptors(image_bytes)
        return {"descriptor": descriptor, "valid": valid}

    def signatures(self):
        return {"serving_default": self.describe_bytes, "images": self.describe_images}

    def saved_state(self):
        """{name: tf.Variable or tf.Module}: what an export of this module keeps besides its
        signatures, for tfmet to read back (`tfmet.export.collection`): the whitening."""
        if not self.whitened:
            return {}
        return {"pca_mean": self.pca_mean, "pca_projection": self.pca_projection}


class LocalDescriptorModule(DescriptorModule):
    """A `DescriptorModule` that also serves local features (`tfmet.descriptors.local`).

    Besides `DescriptorModule`'s signatures, `local_features` takes float32 RGB `images`
    [N, H, W, 3] in [0, 255] (one size per batch) and returns what
    `DescriptorExtractor(local=local).extract_local` gives tfmet-extract, from the same
    backbone passes: `descriptor` [N, D] (whitened as `images`' is), `points` [N, n, 2],
    `local_descriptors` [N, n, local_dim] and `scores` [N, n]. The projection of the local
    features (`projection_matrix` of `local.seed`) is a constant of the exported graph.

    Args:
      embedder: a built or unbuilt `Embedder`.
      local: the `tfmet.descriptors.local.LocalSpec` (num, dim, seed).
      **kwargs: `DescriptorModule`'s other arguments (scales, resize_method, ...).
    """

    def __init__(self, embedder, local, **kwargs):
        super().__init__(embedder, local=local, **kwargs)
        self.describe_local = tf.function(self._describe_local, input_signature=[IMAGES_SPEC])

    def _describe_local(self, images):
        descriptor, points, local_descriptors, scores = self.extractor._extract_local(images)
        return {
            "descriptor": self.whiten(descriptor),
            "points": points,
            "local_descriptors": local_descriptors,
            "scores": scores,
        }

    def signatures(self):
        return {**super().signatures(), "local_features": self.describe_local}
