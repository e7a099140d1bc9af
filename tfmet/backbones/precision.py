"""Reduced precision applied to one model: the Keras dtype policy of a `precision` name
(`tfmet.precision`, the TF-free list of names and their checks) set on its layers.

The policy is set on the layers of the model given (a backbone), never globally, so a process
can hold models of several precisions. What must stay exact -- GeM, L2 normalisation,
PCA-whitening, the classification heads, the kNN rule and the losses -- is built with an explicit
dtype="float32" by its owner (e.g. `tfmet.descriptors.Embedder`), which casts the backbone's
reduced-precision features up to float32 on entry.

One exception to "the backbone computes in bfloat16": in a torchvision-layout bottleneck trunk
(ResNet-50/101, ResNeXt) and in EfficientNet-Lite the stem and the first block stay float32
(`float32_layers`, which asks the backbone's family: `Family.float32_layers`; 8.5% of
ResNet-50's FLOPs, 5.4% of EfficientNet-Lite0's). Measured on
ResNet-50 (docs/extraction.md, "Reduced precision"), the rounding in the first layers -- of the
normalised pixels, of the stem's weights and outputs -- is what the rest of the network
amplifies most; a stage further down contributes 5-300x less. The same holds for
EfficientNet-Lite0 with its ImageNet weights on the demo's real photos, where its first block
(a depthwise and a pointwise conv at full resolution) costs the most.
BasicBlock trunks (ResNet-18/34) and float16 (11 mantissa bits) meet the 0.999 cosine target
without the exception and are left as they were.
"""

from tfmet.backbones import registry
from tfmet.precision import dtype_policy


def float32_layers(model, precision):
    """The layers of `model` that stay float32 under `precision`: for bfloat16, those its
    family names (`Family.float32_layers`: the stem and first block of a bottleneck ResNet or
    of EfficientNet-Lite, whose output the next block reads rounded to bfloat16); nothing for
    float16 and float32, or for families whose bfloat16 meets the cosine target throughout.
    """
    if precision != "bfloat16" or not hasattr(model, "layers"):
        return []
    return registry.family_of(model).float32_layers(model)


def set_precision(model, precision):
    """Sets the dtype policy of `precision` on `model` and every layer inside it; returns `model`.

    Variables keep their float32 storage (mixed policies store in float32), so weights load and
    save as before; only the computation dtype changes. The `float32_layers` of `model` get the
    float32 policy. Works on built models (the policy is read at call time). float32 on a
    float32 model changes nothing.

    Raises:
      ValueError: an unknown precision, or a reduced one on a family that cannot run in it
        (`Family.reduced_precision`: a TF-Hub module runs in the dtype it was saved with).
    """
    import keras

    policy = keras.dtype_policies.get(dtype_policy(precision))
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    family = registry.family_of(model)
    if precision != "float32" and not family.reduced_precision:
        raise ValueError(
            f"{model.name}: a {family.name} backbone runs in the dtype it was saved with. "
            f"Received: precision={precision!r} (use float32)"
        )
    exact = {id(layer) for layer in float32_layers(model, precision)}
    float32 = keras.dtype_policies.get("float32")
    for layer in layers:
        layer.dtype_policy = float32 if id(layer) in exact else policy
    return model


def model_precision(model):
    """ "bfloat16" or "float16" if a layer of `model` computes in it, else "float32"."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if layer.compute_dtype in ("bfloat16", "float16"):
            return layer.compute_dtype
    return "float32"
