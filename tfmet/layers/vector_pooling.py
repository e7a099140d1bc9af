"""What the pooling layers share: features [B, ..., C] -> one vector [B, C] per image."""

import keras


class VectorPooling(keras.layers.Layer):
    """Base of the layers that pool an image's features to one vector ([B, ..., C] -> [B, C]):
    GeM over a feature map, the token pooling of a vision transformer.

    A subclass keeps each constructor argument as the attribute of the same name and lists them
    in `CONFIG`: they are its `get_config` (after the base layer's).
    """

    CONFIG = ()

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.CONFIG})
        return config
