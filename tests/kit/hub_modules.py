"""Fake TF-Hub modules: small tf.Module SavedModels with known weights and variable names.

`TensorModule` / `DictModule` are a two-block 1x1-conv image model (block1 ReLU, stride 2,
block2 with bias minus a non-trainable statistic) returning the feature map, or a dict with a
pooled head output too; `expected_feature_map` is the same computation in numpy.
`SlimHubTrunk` has TF-Slim variable names (net/block<i>/unit_1/...), for fine-tuning rules.
`save_module` writes any of them as a SavedModel directory loadable with "hub:<dir>".
"""

import numpy as np
import tensorflow as tf

RNG = np.random.default_rng(0)
K1 = RNG.normal(size=(3, 4)).astype(np.float32)  # block1 1x1 conv
K2 = RNG.normal(size=(4, 6)).astype(np.float32)  # block2 1x1 conv
B2 = RNG.normal(size=(6,)).astype(np.float32)
MEAN2 = RNG.normal(size=(6,)).astype(np.float32)  # a batch-norm-like statistic (non-trainable)
HEAD = RNG.normal(size=(6, 5)).astype(np.float32)
# The signature of the modules whose `training` argument is a traced input.
IMAGES_AND_TRAINING = [tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([], tf.bool)]


class Trunk(tf.Module):
    """A two-block image model with the reusable-SavedModel attributes."""

    # Plain lists instead of tf.Module's properties: properties are not saved.
    variables = None
    trainable_variables = None

    def __init__(self):
        super().__init__()
        self.k1 = tf.Variable(K1, name="block1/conv/kernel")
        self.k2 = tf.Variable(K2, name="block2/conv/kernel")
        self.b2 = tf.Variable(B2, name="block2/conv/bias")
        self.mean2 = tf.Variable(MEAN2, name="block2/bn/moving_mean", trainable=False)
        self.head = tf.Variable(HEAD, name="head/kernel")
        self.decay = tf.Variable(0.5, name="l2_weight", trainable=False)
        self.regularization_losses = [
            tf.function(
                lambda: self.decay * tf.reduce_sum(tf.square(self.head)), input_signature=[]
            )
        ]
        self.variables = [self.k1, self.k2, self.b2, self.mean2, self.head, self.decay]
        self.trainable_variables = [self.k1, self.k2, self.b2, self.head]

    def feature_map(self, images):
        y = tf.nn.relu(tf.einsum("bhwc,cd->bhwd", images, self.k1))
        y = y[:, ::2, ::2, :]
        return tf.einsum("bhwc,cd->bhwd", y, self.k2) + self.b2 - self.mean2


class TensorModule(Trunk):
    """Returns the feature map; `training` is part of the input_signature."""

    @tf.function(input_signature=IMAGES_AND_TRAINING)
    def __call__(self, images, training=False):
        del training
        return self.feature_map(images)


class DictModule(Trunk):
    """Returns {"default": pooled head output, "feature_map": ...}; traced for both trainings."""

    @tf.function
    def __call__(self, images, training=False):
        fmap = self.feature_map(images)
        return {"default": tf.reduce_mean(fmap, axis=[1, 2]) @ self.head, "feature_map": fmap}


def save_module(module, directory, trace_training=False):
    """Saves `module` as a SavedModel in `directory` (returned); traces both trainings if asked."""
    if trace_training:
        spec = tf.TensorSpec([None, None, None, 3], tf.float32)
        for training in (False, True):
            module.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(module, directory)
    return directory


def expected_feature_map(images, k2=K2, b2=B2):
    """`Trunk.feature_map` in numpy."""
    y = np.maximum(images @ K1, 0.0)[:, ::2, ::2, :]
    return y @ k2 + b2 - MEAN2


class SlimHubTrunk(tf.Module):
    """A TF-Slim-named two-block module with the reusable-SavedModel attributes."""

    variables = None
    trainable_variables = None

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.k1 = tf.Variable(
            rng.normal(size=(3, 4)).astype("float32"), name="net/block1/unit_1/conv/weights"
        )
        self.k2 = tf.Variable(
            rng.normal(size=(4, 5)).astype("float32"), name="net/block2/unit_1/conv/weights"
        )
        self.gamma = tf.Variable(np.ones(5, "float32"), name="net/block2/unit_1/BatchNorm/gamma")
        self.mean = tf.Variable(
            np.zeros(5, "float32"), trainable=False, name="net/block2/unit_1/BatchNorm/moving_mean"
        )
        self.variables = [self.k1, self.k2, self.gamma, self.mean]
        self.trainable_variables = [self.k1, self.k2, self.gamma]

    @tf.function(input_signature=IMAGES_AND_TRAINING)
    def __call__(self, images, training=False):
        del training
        y = tf.nn.relu(tf.einsum("bhwc,cd->bhwd", images, self.k1))
        return tf.einsum("bhwc,cd->bhwd", y, self.k2) * self.gamma - self.mean
