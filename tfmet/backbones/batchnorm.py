"""BatchNorm folding: an inference copy of a backbone with its BatchNorms merged into the convs.

A rewrite of a backbone's graph, so it lives with the backbones; descriptor extraction uses it
(`tfmet.descriptors.spec.folded_embedder`, `build_extractor(fold_bn=True)`).
"""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="tfmet")
class FoldedBatchNorm(keras.layers.Layer):
    """The identity, standing where `fold_batchnorm` folded a BatchNormalization away."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def fold_batchnorm(model):
    """An inference copy of a functional Keras model with BatchNorms folded into their convs.

    Each BatchNormalization whose only input is a Conv2D (channels-last) used by nothing else is
    replaced by that conv with a bias: kernel * s and (bias - mean) * s + beta, where
    s = gamma / sqrt(var + eps). The result computes the same function (float rounding aside,
    ~1e-7 relative) without the per-pixel BN arithmetic, and lets TensorFlow fuse conv + bias +
    ReLU (+ residual add). The input model is not changed.

    Returns:
      (model, number of folded BatchNorms); `model` itself and 0 when nothing can be folded
      (e.g. a subclassed model or a hub module).
    """
    if not hasattr(model, "_nodes_by_depth") or not hasattr(model, "layers"):
        return model, 0
    folds = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if len(layer._inbound_nodes) != 1 or len(layer._inbound_nodes[0].parent_nodes) != 1:
            continue
        conv = layer._inbound_nodes[0].parent_nodes[0].operation
        if (
            type(conv) is keras.layers.Conv2D
            and conv.data_format == "channels_last"
            and layer.axis in (-1, 3, [-1], [3])
            and len(conv._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1
        ):
            folds[conv.name] = layer
    if not folds:
        return model, 0
    folded_away = {id(bn) for bn in folds.values()}

    def clone(layer):
        if layer.name in folds:
            return keras.layers.Conv2D.from_config(layer.get_config() | {"use_bias": True})
        if id(layer) in folded_away:
            return FoldedBatchNorm(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        if layer.name in folds:
            bn = folds[layer.name]
            kernel = np.asarray(layer.kernel, np.float64)
            bias = np.asarray(layer.bias, np.float64) if layer.use_bias else 0.0
            gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
            beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
            mean = np.asarray(bn.moving_mean, np.float64)
            var = np.asarray(bn.moving_variance, np.float64)
            scale = gamma / np.sqrt(var + bn.epsilon)
            target.set_weights(
                [
                    (kernel * scale).astype(np.float32),
                    ((bias - mean) * scale + beta).astype(np.float32),
                ]
            )
        elif id(layer) not in folded_away:
            target.set_weights(layer.get_weights())
    return folded, len(folds)
