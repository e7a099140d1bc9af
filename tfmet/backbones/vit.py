"""DINOv2 / DINOv3 vision transformers: keras-hub's backbones run at any image size in one trace.

keras-hub's `DINOV2Backbone` and `DINOV3Backbone` hold the layers and weights (and keras-hub's
converters read Hugging Face checkpoints into them, see `tfmet.backbones.huggingface`). Two
things keep them from serving tfmet's extraction as they are: the functional graph is built for
one `image_shape`, and DINOv2's position embeddings are interpolated once, when the layer is
built, to that shape (with Keras' bicubic resize, which is not the reference's). `VisionTransformer`
calls the same sub-layers on a tensor of any height and width and interpolates DINOv2's position
embeddings per call exactly as the Hugging Face reference does:

- `Dinov2Model`: `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`, the
  cubic convolution with a = -0.75 and clamped borders;
- `Dinov2WithRegistersModel`: the same with `antialias=True`, torch's separable antialiased
  cubic filter (a = -0.5, support widened by the scale when shrinking, window clipped at the
  borders and renormalised).

Both are linear maps along each axis, so they are written as [out, in] weight matrices computed
from the (dynamic) output size: one trace serves every image size. DINOv3 uses rotary position
embeddings, computed here from the dynamic grid size (`rotary_embeddings`; keras-hub's layer
fails on unknown spatial dims inside a graph).

Images of a size that is not a multiple of the patch size lose the remainder rows/columns (the
strided patch convolution drops them, as the reference's does). The output is the final-norm
token sequence [B, 1 + registers + patches, C]; `num_prefix_tokens` says where patches start.
"""

import math

import keras
import tensorflow as tf

FAMILIES = ("dinov2", "dinov3")
INTERPOLATIONS = ("bicubic", "bicubic_antialias")


def _cubic(x, a):
    """Keys' cubic convolution kernel with parameter `a` at distances `x` (any sign)."""
    x = tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def bicubic_weights(in_size, out_size):
    """[out_size, in_size] matrix of torch's bicubic resize (align_corners=False, a=-0.75)."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    source = scale * (tf.range(out_size, dtype=tf.float32) + 0.5) - 0.5
    first = tf.floor(source)
    t = source - first
    weights = tf.stack(
        [_cubic(t + 1.0, -0.75), _cubic(t, -0.75), _cubic(1.0 - t, -0.75), _cubic(2.0 - t, -0.75)],
        axis=1,
    )
    taps = tf.cast(first, tf.int32)[:, None] + tf.range(-1, 3)[None, :]
    taps = tf.clip_by_value(taps, 0, in_size - 1)  # torch reads borders clamped
    return tf.einsum("ok,oki->oi", weights, tf.one_hot(taps, in_size, dtype=tf.float32))


def bicubic_antialias_weights(in_size, out_size):
    """[out_size, in_size] matrix of torch's bicubic resize with antialias=True (a=-0.5)."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    widen = tf.maximum(scale, 1.0)
    support = 2.0 * widen
    center = scale * (tf.range(out_size, dtype=tf.float32) + 0.5)[:, None]
    low = tf.maximum(tf.floor(center - support + 0.5), 0.0)
    high = tf.minimum(tf.floor(center + support + 0.5), tf.cast(in_size, tf.float32))
    source = tf.range(in_size, dtype=tf.float32)[None, :]
    inside = tf.logical_and(source >= low, source < high)
    weights = tf.where(inside, _cubic((source - center + 0.5) / widen, -0.5), 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    return weights / tf.where(total == 0.0, 1.0, total)


def interpolate_position_embeddings(position_embeddings, height, width, antialias=False):
    """The class + patch position embeddings [1, 1 + h*w, C] for an h x w patch grid.

    `position_embeddings` [1, 1 + n*n, C] are the pretrained ones on an n x n grid; `height` and
    `width` may be tensors. Same numbers as the Hugging Face DINOv2 `interpolate_pos_encoding`.
    """
    grid = tf.shape(position_embeddings)[1] - 1
    side = tf.cast(tf.round(tf.sqrt(tf.cast(grid, tf.float32))), tf.int32)
    dim = tf.shape(position_embeddings)[-1]
    patch = tf.reshape(position_embeddings[0, 1:], tf.stack([side, side, dim]))
    matrix = bicubic_antialias_weights if antialias else bicubic_weights
    resized = tf.einsum("hi,wj,ijc->hwc", matrix(side, height), matrix(side, width), patch)
    resized = tf.reshape(resized, tf.stack([1, height * width, dim]))
    return tf.concat([position_embeddings[:, :1], resized], axis=1)


def rotary_embeddings(height, width, inv_freq):
    """DINOv3's rotary (cos, sin) [h*w, 4 * len(inv_freq)] for an h x w patch grid.

    Patch centres in [-1, 1] on each axis, as Hugging Face `DINOv3ViTRopePositionEmbedding`
    computes them at inference; `height` / `width` may be tensors (keras-hub's layer casts the
    grid size in a way that fails for dynamic shapes in a graph).
    """

    def centres(n):
        n = tf.cast(n, tf.float32)
        return 2.0 * (tf.range(0.5, n, dtype=tf.float32) / n) - 1.0

    rows, cols = tf.meshgrid(centres(height), centres(width), indexing="ij")
    coords = tf.stack([tf.reshape(rows, [-1]), tf.reshape(cols, [-1])], axis=-1)
    angles = 2.0 * math.pi * coords[:, :, None] * tf.cast(inv_freq, tf.float32)[None, None, :]
    angles = tf.tile(tf.reshape(angles, tf.stack([tf.shape(coords)[0], -1])), [1, 2])
    return tf.cos(angles), tf.sin(angles)


@keras.saving.register_keras_serializable(package="tfmet")
class VisionTransformer(keras.Model):
    """Images [B, H, W, 3] (normalised) -> final-norm tokens [B, 1 + R + h*w, C], any H, W.

    Args:
      backbone: a keras-hub `DINOV2Backbone` or `DINOV3Backbone` (or its config dict).
      interpolation: DINOv2 only: "bicubic" (Dinov2Model) or "bicubic_antialias"
        (Dinov2WithRegistersModel); ignored for DINOv3 (rotary embeddings).
    """

    def __init__(self, backbone, interpolation="bicubic", **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            import keras_hub  # noqa: F401  (registers the keras-hub classes)

            backbone = keras.saving.deserialize_keras_object(backbone)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"`interpolation` must be one of {INTERPOLATIONS}. "
                f"Received: interpolation={interpolation!r}"
            )
        self.backbone = backbone
        self.interpolation = interpolation
        self.family = "dinov3" if hasattr(backbone, "rope_embedding") else "dinov2"
        self.built = True  # the keras-hub backbone holds every variable, built already
        embeddings = backbone.embeddings
        # Variables this call never reads must not ask an optimizer for gradients.
        for unused in ("mask_token", "interpolated_position_embeddings"):
            if hasattr(embeddings, unused):
                getattr(embeddings, unused).trainable = False

    @property
    def hidden_dim(self):
        return int(self.backbone.hidden_dim)

    @property
    def patch_size(self):
        return int(self.backbone.patch_size)

    @property
    def num_prefix_tokens(self):
        """Class token + registers: the patch tokens start at this index."""
        return 1 + int(self.backbone.num_register_tokens)

    @property
    def blocks(self):
        """The transformer blocks, bottom first."""
        return list(self.backbone.encoder.layers)

    @property
    def final_norm(self):
        return self.backbone.layernorm

    def build(self, input_shape):
        self.built = True  # the keras-hub backbone is built when constructed

    def _dinov2_tokens(self, images, training):
        embeddings = self.backbone.embeddings
        batch = tf.shape(images)[0]
        height = tf.shape(images)[1] // self.patch_size
        width = tf.shape(images)[2] // self.patch_size
        patches = embeddings.patch_embeddings(images, training=training)
        cls = tf.tile(tf.convert_to_tensor(embeddings.cls_token), tf.stack([batch, 1, 1]))
        tokens = tf.concat([cls, patches], axis=1)
        # Interpolated in float32 whatever the compute dtype (a reduced-precision policy reads
        # the variable in bfloat16 / float16); the sum is taken in the tokens' dtype.
        position = interpolate_position_embeddings(
            tf.cast(embeddings.position_embeddings, tf.float32),
            height,
            width,
            antialias=self.interpolation == "bicubic_antialias",
        )
        tokens += tf.cast(position, tokens.dtype)
        if self.num_prefix_tokens > 1:
            registers = tf.tile(
                tf.convert_to_tensor(embeddings.register_tokens), tf.stack([batch, 1, 1])
            )
            tokens = tf.concat([tokens[:, :1], registers, tokens[:, 1:]], axis=1)
        tokens, _ = self.backbone.encoder(tokens, training=training)
        return tokens

    def _dinov3_tokens(self, images, training):
        tokens = self.backbone.embeddings(images, training=training)
        rope = rotary_embeddings(
            tf.shape(images)[1] // self.patch_size,
            tf.shape(images)[2] // self.patch_size,
            self.backbone.rope_embedding.inv_freq,
        )
        rope = tuple(tf.cast(r, tokens.dtype) for r in rope)  # computed in float32
        tokens, _ = self.backbone.encoder(
            tokens,
            position_embeddings=rope,
            num_prefix_tokens=self.num_prefix_tokens,
            training=training,
        )
        return tokens

    def call(self, images, training=False):
        images = tf.convert_to_tensor(images, self.compute_dtype)
        if self.family == "dinov3":
            tokens = self._dinov3_tokens(images, training)
        else:
            tokens = self._dinov2_tokens(images, training)
        return self.final_norm(tokens)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "interpolation": self.interpolation,
            }
        )
        return config
