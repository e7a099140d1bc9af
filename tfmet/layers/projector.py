"""The descriptor projector: Dense(d -> d', bias), optionally initialised from PCA-whitening."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="tfmet")
class Projector(keras.layers.Dense):
    """A Dense layer with bias that maps descriptors to the (whitened) projection space.

    `Projector.from_pca(mean, projection)` sets W = P and b = -m P, so that
    `projector(x) = (x - m) P`. In the PyTorch convention (weight [out, in]) this is W = P^T.

    Args:
      units: output dimension.
      **kwargs: passed to `keras.layers.Dense` (use_bias is always True).
    """

    def __init__(self, units, **kwargs):
        kwargs.pop("use_bias", None)
        kwargs.pop("activation", None)
        super().__init__(units, use_bias=True, activation=None, **kwargs)

    def set_pca(self, mean, projection):
        """Initialises the weights from PCA-whitening `mean` [d] and `projection` [d, units]."""
        mean = np.asarray(mean, dtype=np.float64)
        projection = np.asarray(projection, dtype=np.float64)
        if projection.ndim != 2 or projection.shape[1] != self.units:
            raise ValueError(
                f"`projection` must have shape [d, {self.units}]. "
                f"Received: projection.shape={projection.shape}"
            )
        if mean.shape != (projection.shape[0],):
            raise ValueError(
                f"`mean` must have shape [{projection.shape[0]}]. Received: mean.shape={mean.shape}"
            )
        if not self.built:
            self.build((None, projection.shape[0]))
        elif self.kernel.shape[0] != projection.shape[0]:
            raise ValueError(
                f"Projector was built for input dimension {self.kernel.shape[0]}. "
                f"Received: projection for dimension {projection.shape[0]}"
            )
        self.kernel.assign(projection.astype(np.float32))
        self.bias.assign((-mean @ projection).astype(np.float32))

    @classmethod
    def from_pca(cls, mean, projection, **kwargs):
        layer = cls(int(np.shape(projection)[1]), **kwargs)
        layer.set_pca(mean, projection)
        return layer

    def get_config(self):
        config = super().get_config()
        for key in ("use_bias", "activation"):
            config.pop(key, None)
        return config
