"""tfmet: TensorFlow/Keras toolkit for recognising artworks.

Instance-level recognition on The Met dataset (multi-scale GeM descriptors, PCA-whitening,
ScaNN kNN with a softmax confidence, GAP metrics) and artistic-style classification.
"""

__version__ = "0.1.0"
