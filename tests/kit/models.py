"""Tiny Keras backbones with known structure, for tests that need a feature extractor."""

import keras


def tiny_backbone(channels=8, seed=0):
    """A two-conv feature extractor [B, H, W, 3] -> [B, H/4, W/4, channels] with seeded weights."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((None, None, 3))
    y = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(y)
    return keras.Model(x, y, name="tiny_backbone")


def one_conv_backbone(channels=4, seed=0):
    """One 3x3 stride-4 ReLU conv [B, H, W, 3] -> [B, ~H/4, ~W/4, channels], seeded weights."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((None, None, 3))
    return keras.Model(x, keras.layers.Conv2D(channels, 3, strides=4, activation="relu")(x))


def relu_backbone(channels=3):
    """The feature map is the ReLU of the input itself: values in tests can be worked by hand."""
    x = keras.Input((None, None, channels))
    return keras.Model(x, keras.layers.ReLU()(x), name="relu_backbone")


def calibrate_batchnorm(model, images):
    """Sets every BatchNorm's moving statistics to the batch statistics of `images` (one pass).

    A randomly initialised trunk then has activations of realistic scale (BN normalises them, as
    in a trained one), which is what reduced-precision rounding errors grow through.
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, saved, strict=True):
        layer.momentum = momentum


def tiny_spec(**overrides):
    """The `ExtractionSpec` of `tiny_backbone(seed=3)` at the Met scales (torch resize, no
    max side, 8-d, chunks of 3), with `overrides`: the spec tests give their stores."""
    from tfmet.descriptors import MET_SCALES
    from tfmet.descriptors import spec as spec_lib

    fields = dict(
        backbone="tiny",
        weights="random:seed=3",
        scales=MET_SCALES,
        resize_method="torch",
        max_side=None,
        dim=8,
        chunk_size=3,
    )
    return spec_lib.ExtractionSpec(**(fields | overrides))
