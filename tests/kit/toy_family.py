"""A backbone family defined outside tfmet, as a new family would be: one module.

Importing it registers the family and the backbone "toy_net": two conv blocks ("top", "bottom")
and a stem. Its converter reads an `.npz` of kernels named after the layers. Fine-tuning,
reduced precision and `tfmet-convert-weights` reach it through the registry alone.
"""

import keras
import numpy as np

from tfmet.backbones import family, registry
from tfmet.backbones.torch_convert import save_weights

LAYERS = ("stem_conv", "bottom_conv", "top_conv")


class ToyFamily(family.Family):
    name = "toy"

    def matches(self, model):
        return getattr(model, "name", None) == "toy_net"

    def blocks(self, model):
        return ["top", "bottom", "stem"]

    def block_layers(self, model, block):
        return [model.get_layer(f"{block}_conv")]

    def float32_layers(self, model):
        return [model.get_layer("stem_conv")]

    def convert(self, checkpoint, arch, out):
        model = registry.get(arch)
        with np.load(checkpoint, allow_pickle=False) as arrays:
            for name in LAYERS:
                model.get_layer(name).kernel.assign(arrays[name])
        metadata = {"arch": arch, "kind": "backbone", "source": "toy"}
        save_weights(model, out, **metadata)
        return metadata


FAMILY = registry.register_family(ToyFamily())


def build(weights=None):
    images = keras.Input((None, None, 3))
    x = images
    for name in LAYERS:
        x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name=name)(x)
    model = keras.Model(images, x, name="toy_net")
    if weights is not None:
        model.load_weights(weights)
    return model


registry.register(
    registry.BackboneSpec(
        name="toy_net",
        builder=build,
        preprocessing=registry.SCALE_ZERO_ONE,
        description="three 3x3 convs (tests)",
        family=FAMILY,
    )
)
