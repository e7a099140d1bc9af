"""The descriptor model: backbone -> GeM -> L2 -> [projector -> L2], and multi-scale extraction."""

import math

import keras
import tensorflow as tf

from tfmet import backbones
from tfmet.backbones.registry import Preprocessing, family_of
from tfmet.descriptors import local as local_lib
from tfmet.descriptors.resize import resize
from tfmet.layers import GeMPooling2D, L2Normalize, Projector, TokenPooling, l2_normalize

# Scales of the Met reference's multi-scale extraction.
MET_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
# "gem" pools a CNN feature map; "cls" / "avg" pool a vision transformer's tokens.
POOLINGS = ("gem", "cls", "avg")


def build_backbone(backbone, input_shape):
    """Builds `backbone` for images of `input_shape` unless it is built; returns the shape of its
    features (what the pooling and the head on top are built for). The embedder and the style
    classifier build their backbones so."""
    if not backbone.built:
        backbone.build(input_shape)
    return backbone.compute_output_shape(input_shape)


def backbone_input(images, preprocessing):
    """Float RGB images in [0, 255] -> the input of a backbone whose `preprocessing` (a
    `tfmet.backbones.registry.Preprocessing`, or None for none) is given."""
    images = tf.cast(images, tf.float32)
    return images if preprocessing is None else preprocessing(images)


@keras.saving.register_keras_serializable(package="tfmet")
class Embedder(keras.Model):
    """L2-normalised GeM descriptor of a backbone's last feature map, optionally projected.

    `call` takes images already normalised for the backbone; `preprocess` maps float RGB images
    in [0, 255] to that input (identity when `preprocessing` is None).

    Args:
      backbone: Keras model from [B, H, W, 3] to a feature map [B, h, w, C].
      p: initial GeM power.
      eps: GeM clamp.
      train_p: whether the GeM power is trainable.
      projector_dim: output size of the projector (Dense with bias, then L2); None for none.
      preprocessing: the backbone's input normalisation, a `Preprocessing` (or its config dict).
      pooling: "gem" (a feature map [B, h, w, C]), or for a vision transformer's tokens
        [B, T, C] "cls" (the class token) or "avg" (mean of the patch tokens, registers
        excluded; the backbone's `num_prefix_tokens` says where patches start).
    """

    def __init__(
        self,
        backbone,
        p=3.0,
        eps=1e-6,
        train_p=True,
        projector_dim=None,
        preprocessing=None,
        pooling="gem",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_config(preprocessing)
        if projector_dim is not None and int(projector_dim) <= 0:
            raise ValueError(
                f"`projector_dim` must be positive or None. Received: projector_dim={projector_dim}"
            )
        self.backbone = backbone
        self.p = float(p)
        self.eps = float(eps)
        self.train_p = bool(train_p)
        self.projector_dim = None if projector_dim is None else int(projector_dim)
        self.preprocessing = preprocessing
        self.pooling = pooling
        if pooling == "gem":
            self.pool = GeMPooling2D(p=p, eps=eps, train_p=train_p, name="gem", dtype="float32")
        else:
            prefix = getattr(backbone, "num_prefix_tokens", 1)
            self.pool = TokenPooling(
                pooling, num_prefix_tokens=prefix, name="tokens", dtype="float32"
            )
        # Pooling, L2 and the projector compute in float32 whatever the backbone's precision
        # (`tfmet.backbones.precision`): they cast its features up on entry.
        self.normalize = L2Normalize(name="l2", dtype="float32")
        self.projector = (
            None
            if projector_dim is None
            else Projector(self.projector_dim, name="projector", dtype="float32")
        )

    @classmethod
    def from_registry(cls, name, weights=None, **kwargs):
        """An Embedder over registered backbone `name`, with that backbone's preprocessing."""
        spec = backbones.spec(name)
        kwargs.setdefault("pooling", spec.pooling)
        return cls(spec.builder(weights=weights), preprocessing=spec.preprocessing, **kwargs)

    def build(self, input_shape):
        feature_shape = build_backbone(self.backbone, input_shape)
        self.pool.build(feature_shape)
        if self.projector is not None and not self.projector.built:
            self.projector.build((None, feature_shape[-1]))
        self.built = True

    def preprocess(self, images):
        """Float RGB images in [0, 255] -> backbone input."""
        return backbone_input(images, self.preprocessing)

    def call(self, images, training=False):
        return self.head(self.backbone(images, training=training))

    def head(self, features):
        """The descriptor of backbone output `features`: pooling, L2 [, projector, L2]."""
        descriptor = self.normalize(self.pool(features))
        if self.projector is not None:
            descriptor = self.normalize(self.projector(descriptor))
        return descriptor

    @property
    def output_dim(self):
        if self.projector_dim is not None:
            return self.projector_dim
        return int(self.backbone.compute_output_shape((None, None, None, 3))[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "p": self.p,
                "eps": self.eps,
                "train_p": self.train_p,
                "projector_dim": self.projector_dim,
                "pooling": self.pooling,
                "preprocessing": (
                    None if self.preprocessing is None else self.preprocessing.get_config()
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def multiscale_embed(embed_fn, images, scales=MET_SCALES, method="torch"):
    """L2(mean over `scales` of embed_fn(resize(images, s))), as the Met reference extracts.

    `embed_fn` returns L2-normalised rows; `images` are normalised NHWC; `method` is the resize
    ("torch": PyTorch scale_factor semantics, or "tf").
    """
    if not scales:
        raise ValueError("`scales` must not be empty.")
    total = tf.add_n([embed_fn(resize(images, s, method)) for s in scales])
    return l2_normalize(total / float(len(scales)))


class DescriptorExtractor(tf.Module):
    """Raw images [B, H, W, 3] in [0, 255] -> descriptors [B, D], compiled once for any H, W.

    Args:
      embedder: an `Embedder`.
      scales: the scales to average; `MET_SCALES` for multi-scale, (1.0,) for single-scale.
      resize_method: "torch" (PyTorch-compatible bilinear, the default for fidelity) or "tf".
      local: None, or a `tfmet.descriptors.local.LocalSpec`: `extract_local` then also gives
        each image's local features, from the same backbone passes (the backbone's family says
        which map: `Family.local_probe`).
    """

    def __init__(self, embedder, scales=MET_SCALES, resize_method="torch", local=None, name=None):
        super().__init__(name=name)
        if resize_method not in ("torch", "tf"):
            raise ValueError(
                "`resize_method` must be 'torch' or 'tf'. "
                f"Received: resize_method={resize_method!r}"
            )
        if not embedder.built:  # create variables now so the tf.function traces once
            embedder.build((None, None, None, 3))
        self.embedder = embedder
        self.scales = tuple(float(s) for s in scales)
        self.resize_method = resize_method
        signature = [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
        self.extract = tf.function(self._extract, input_signature=signature, reduce_retracing=True)
        self.local = local
        if local is not None:
            self._probe = family_of(embedder.backbone).local_probe(embedder.backbone)
            channels = int(self._probe(tf.zeros((1, 64, 64, 3)))[0].shape[-1])
            self._projection = local_lib.projection_matrix(channels, local.dim, local.seed)
            self.local_dim = channels if self._projection is None else int(local.dim)
            self.extract_local = tf.function(
                self._extract_local, input_signature=signature, reduce_retracing=True
            )

    def _extract(self, images):
        normalised = self.embedder.preprocess(images)
        embed = lambda x: self.embedder(x, training=False)
        return multiscale_embed(embed, normalised, self.scales, self.resize_method)

    def _extract_local(self, images):
        """(descriptors [B, D], points [B, n, 2], local descriptors [B, n, d], scores [B, n]):
        the global descriptors equal `extract`'s; the local features are `local.num` of all
        scales' (`tfmet.descriptors.local.select`, `merge`)."""
        normalised = self.embedder.preprocess(images)
        size = tf.cast(tf.shape(images)[1:3], tf.float32)
        descriptors, selections = [], []
        for scale in self.scales:
            resized = resize(normalised, scale, self.resize_method)
            local_map, cell, output = self._probe(resized)
            descriptors.append(self.embedder.head(output))
            to_original = size / tf.cast(tf.shape(resized)[1:3], tf.float32)
            selections.append(
                local_lib.select(
                    local_map,
                    cell * to_original,
                    tf.reduce_max(size),
                    self.local.num,
                    self._projection,
                )
            )
        descriptor = l2_normalize(tf.add_n(descriptors) / float(len(self.scales)))
        return (descriptor, *local_lib.merge(selections, self.local.num))

    def __call__(self, images):
        return self.extract(tf.convert_to_tensor(images, tf.float32))
