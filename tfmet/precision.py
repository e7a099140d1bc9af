"""The precisions a backbone computes in: the one list of names, TF-free.

    float32    every layer computes and stores in float32 (the default; unchanged behaviour)
    bfloat16   "mixed_bfloat16": variables stay float32, the backbone computes in bfloat16
    float16    "mixed_float16": the same in float16 (training adds loss scaling)

Every check of a precision name -- program flags, config entries, `ExtractionSpec` -- uses
`check_precision`. This module imports nothing (a bottom layer in setup.cfg's import-linter
contract), so a program checks its `--precision` before TensorFlow loads. Applying a precision to
a model is `tfmet.backbones.precision`.
"""

PRECISIONS = ("float32", "bfloat16", "float16")
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# What a precision computes, where it changed after descriptors of it were stored: bfloat16 3
# also keeps EfficientNet-Lite's stem and first block in float32; 2 kept only those of a
# bottleneck ResNet (`tfmet.backbones.precision.float32_layers`); 1 (stores without the field)
# ran every backbone layer in bfloat16. Stores record it
# (`tfmet.descriptors.spec.ExtractionSpec`) so that the two are never mixed -- for every
# backbone, also those whose bfloat16 did not change (a store does not say which layers ran how).
PRECISION_VERSIONS = {"bfloat16": 3}


def check_precision(precision, name="`precision`"):
    """Returns `precision` if it is one of `PRECISIONS`; raises ValueError naming `name`
    (e.g. "--precision", "config `model.precision`") otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}. Received: {precision!r}")
    return precision


def dtype_policy(precision):
    """The Keras dtype policy name of `precision` ("float32", "mixed_bfloat16", ...)."""
    return DTYPE_POLICIES[check_precision(precision)]


def precision_version(precision):
    """The version of what `precision` computes (`PRECISION_VERSIONS`; 1 where it never changed)."""
    return PRECISION_VERSIONS.get(check_precision(precision), 1)
