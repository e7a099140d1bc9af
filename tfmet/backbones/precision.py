"""Reduced precision: which Keras dtype policy a `precision` name means, applied to one model.

    float32    every layer computes and stores in float32 (the default; unchanged behaviour)
    bfloat16   "mixed_bfloat16": variables stay float32, the backbone computes in bfloat16
    float16    "mixed_float16": the same in float16 (training adds loss scaling)

The policy is set on the layers of the model given (a backbone), never globally, so a process
can hold models of several precisions. What must stay exact -- GeM, L2 normalisation,
PCA-whitening, the classification heads, the kNN rule and the losses -- is built with an explicit
dtype="float32" by its owner (e.g. `tfmet.descriptors.Embedder`), which casts the backbone's
reduced-precision features up to float32 on entry.
"""

PRECISIONS = ("float32", "bfloat16", "float16")
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def check_precision(precision):
    """Returns `precision` if it is one of `PRECISIONS`; raises ValueError naming it otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}"
        )
    return precision


def dtype_policy(precision):
    """The Keras dtype policy name of `precision` ("float32", "mixed_bfloat16", ...)."""
    return DTYPE_POLICIES[check_precision(precision)]


def set_precision(model, precision):
    """Sets the dtype policy of `precision` on `model` and every layer inside it; returns `model`.

    Variables keep their float32 storage (mixed policies store in float32), so weights load and
    save as before; only the computation dtype changes. Works on built models (the policy is read
    at call time). float32 on a float32 model changes nothing.

    Raises:
      ValueError: an unknown precision, or a reduced one on a TF-Hub module (a SavedModel runs
        in the dtype it was saved with).
    """
    import keras

    from tfmet.backbones.hub import HubModule

    policy = keras.dtype_policies.get(dtype_policy(precision))
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    if precision != "float32" and any(isinstance(layer, HubModule) for layer in layers):
        raise ValueError(
            f"{model.name}: a TF-Hub module runs in the dtype it was saved with. "
            f"Received: precision={precision!r} (use float32)"
        )
    for layer in layers:
        layer.dtype_policy = policy
    return model


def model_precision(model):
    """ "bfloat16" or "float16" if a layer of `model` computes in it, else "float32"."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if layer.compute_dtype in ("bfloat16", "float16"):
            return layer.compute_dtype
    return "float32"
