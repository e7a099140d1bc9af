"""Style classifier: backbone -> pooling (GAP or GeM) -> dropout -> a softmax head per attribute.

`StyleClassifier` takes float RGB images in [0, 255] (it applies the backbone's preprocessing
itself) and returns one logits tensor per attribute, e.g. {"style": [B, 18], "artist": [B, 200]}.
Its `features` method gives the pooled features; its `head` (a `StyleHead`) maps features to
logits, so a head trained on cached features (bottleneck mode) drops into the full classifier.

Labels of -1 mean "not annotated": `MaskedSparseCrossEntropy` and the top-k metrics skip them.
"""

import keras
import tensorflow as tf

from tfmet import backbones
from tfmet.backbones.registry import Preprocessing
from tfmet.descriptors.embedder import backbone_input, build_backbone
from tfmet.layers import GeMPooling2D, token_pool

POOLINGS = ("gap", "gem")


@keras.saving.register_keras_serializable(package="tfmet")
class StyleHead(keras.Model):
    """Dropout then one Dense (logits) per attribute, on pooled features [B, D].

    Args:
      class_names: attribute -> list of class names (fixes the attributes, their order and the
        number of outputs of each head).
      dropout: dropout rate before the heads.
    """

    def __init__(self, class_names, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if not class_names:
            raise ValueError("`class_names` must name at least one attribute. Received: {}")
        for attribute, names in class_names.items():
            if len(names) < 2:
                raise ValueError(
                    f"attribute {attribute!r} needs at least two classes. Received: {names}"
                )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.class_names = {a: list(n) for a, n in class_names.items()}
        self.dropout = float(dropout)
        # The heads compute in float32 whatever the backbone's precision.
        self.drop = keras.layers.Dropout(self.dropout, name="dropout", dtype="float32")
        self.heads = {
            a: keras.layers.Dense(len(n), name=f"{a}_logits", dtype="float32")
            for a, n in self.class_names.items()
        }

    @property
    def attributes(self):
        return list(self.class_names)

    def build(self, input_shape):
        for head in self.heads.values():
            if not head.built:
                head.build(input_shape)
        self.built = True

    def call(self, features, training=False):
        x = self.drop(features, training=training)
        return {a: head(x) for a, head in self.heads.items()}

    def get_config(self):
        config = super().get_config()
        config.update({"class_names": self.class_names, "dropout": self.dropout})
        return config


@keras.saving.register_keras_serializable(package="tfmet")
class StyleClassifier(keras.Model):
    """Images in [0, 255] -> {attribute: logits}.

    Args:
      backbone: Keras model [B, H, W, 3] -> feature map [B, h, w, C].
      head: a `StyleHead` (or its config) over C-dimensional features.
      pooling: "gap" (global average) or "gem" (generalised mean, trainable p).
      gem_p: initial GeM power.
      preprocessing: the backbone's input normalisation (`Preprocessing` or its config); None
        feeds the [0, 255] images unchanged.
      backbone_name: the registry name, kept for fine-tuning rules and cache keys.
      batchnorm: "frozen" calls the backbone with training=False always (BatchNorm in inference
        mode); "train" passes the training flag through (see `tfmet.training.style.finetune`).

    A backbone that already returns pooled features [B, C] (e.g. a hub feature-vector module) is
    used without pooling; a vision transformer's tokens [B, T, C] give their class token.
    """

    def __init__(
        self,
        backbone,
        head,
        pooling="gap",
        gem_p=3.0,
        preprocessing=None,
        backbone_name=None,
        batchnorm="frozen",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if batchnorm not in ("frozen", "train"):
            raise ValueError(
                f"`batchnorm` must be 'frozen' or 'train'. Received: batchnorm={batchnorm!r}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_config(preprocessing)
        if isinstance(head, dict):
            head = keras.saving.deserialize_keras_object(head)
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        self.gem_p = float(gem_p)
        self.preprocessing = preprocessing
        self.backbone_name = backbone_name
        self.batchnorm = batchnorm
        # Pooling computes in float32 whatever the backbone's precision.
        if pooling == "gem":
            self.pool = GeMPooling2D(p=gem_p, name="gem", dtype="float32")
        else:
            self.pool = keras.layers.GlobalAveragePooling2D(name="gap", dtype="float32")

    @classmethod
    def from_registry(cls, backbone, class_names, weights=None, dropout=0.0, **kwargs):
        """A classifier over registered backbone `backbone` with its preprocessing."""
        spec = backbones.spec(backbone)
        return cls(
            spec.builder(weights=weights),
            StyleHead(class_names, dropout=dropout, name="head"),
            preprocessing=spec.preprocessing,
            backbone_name=backbone,
            **kwargs,
        )

    @property
    def class_names(self):
        return self.head.class_names

    @property
    def attributes(self):
        return self.head.attributes

    def build(self, input_shape):
        feature_shape = build_backbone(self.backbone, input_shape)
        if len(feature_shape) == 4:
            self.pool.build(feature_shape)
        if not self.head.built:
            self.head.build((None, feature_shape[-1]))
        self.built = True

    def preprocess(self, images):
        return backbone_input(images, self.preprocessing)

    def features(self, images, training=False):
        """Pooled backbone features [B, C] of images in [0, 255]."""
        backbone_training = bool(training) and self.batchnorm == "train"
        feature_map = self.backbone(self.preprocess(images), training=backbone_training)
        if len(feature_map.shape) == 2:
            return feature_map
        if len(feature_map.shape) == 3:  # a vision transformer's tokens: its class token
            return token_pool(feature_map, "cls")
        return self.pool(feature_map)

    def call(self, images, training=False):
        return self.head(self.features(images, training=training), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "head": keras.saving.serialize_keras_object(self.head),
                "pooling": self.pooling,
                "gem_p": self.gem_p,
                "preprocessing": (
                    None if self.preprocessing is None else self.preprocessing.get_config()
                ),
                "backbone_name": self.backbone_name,
                "batchnorm": self.batchnorm,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfmet")
class MaskedSparseCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy from logits, averaged over the rows whose label is >= 0.

    A batch without any label gives 0 (so an attribute missing in a batch adds nothing).

    Under a tf.distribute strategy with several replicas (in replica context, as in
    `keras.Model.fit`), each replica divides the sum of its rows' losses by the number of
    labelled rows of the GLOBAL batch (all-reduced): the replicas' gradients, which the
    optimizer sums, are then the single-device gradient of the global batch, however unevenly
    the labelled rows fall on the replicas.
    """

    def __init__(self, name="masked_sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        valid = labels >= 0
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.maximum(labels, 0), logits=tf.cast(y_pred, tf.float32)
        )
        losses = tf.where(valid, losses, tf.zeros_like(losses))
        count = tf.reduce_sum(tf.cast(valid, tf.float32))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
        return tf.reduce_sum(losses) / tf.maximum(count, 1.0)


def masked_cross_entropy(labels, logits):
    """The value of `MaskedSparseCrossEntropy` as a plain function (float)."""
    return float(MaskedSparseCrossEntropy()(labels, logits))
