"""The descriptor-model flags shared by tfmet-extract, tfmet-extract-beam and tfmet-export.

Defined once, here, so every program describes the model the same way and two programs' modules
can be imported in one process (absl refuses a flag defined twice).
"""

from absl import flags

from tfmet import precision
from tfmet.cli.common import UsageError

flags.DEFINE_string("backbone", "resnet18", "Backbone registry name (tfmet.backbones.names()).")
flags.DEFINE_string(
    "weights",
    None,
    "Backbone weights file, or 'imagenet' for the packaged weights (efficientnet_lite0); none "
    "for a seeded random init.",
)
flags.DEFINE_string("model", None, "A saved Embedder (.keras) to use instead of --backbone.")
flags.DEFINE_integer("seed", 0, "Seed of the random initialisation when --weights is not given.")
flags.DEFINE_bool("multiscale", True, "Average the scales 1, 1/sqrt(2), 1/2 (else scale 1 only).")
flags.DEFINE_enum("resize_method", "torch", ["torch", "tf"], "Multi-scale resize semantics.")
flags.DEFINE_integer("max_side", None, "Downscale images whose long side exceeds this.")
flags.DEFINE_string(
    "precision",
    "float32",
    f"What the backbone computes in: {', '.join(precision.PRECISIONS)} (GeM, L2 and PCA stay "
    "float32).",
)

NAMES = (
    "backbone",
    "weights",
    "model",
    "seed",
    "multiscale",
    "resize_method",
    "max_side",
    "precision",
)


def values():
    """The model flags' current values, as a dict."""
    return {name: flags.FLAGS[name].value for name in NAMES}


def check_precision(settings):
    """Raises UsageError unless `settings["precision"]` is a precision tfmet knows."""
    try:
        precision.check_precision(settings["precision"], "--precision")
    except ValueError as error:
        raise UsageError(str(error)) from None


def build_extractor(settings, **kwargs):
    """`tfmet.descriptors.spec.build_extractor` from model settings (see `values`).

    `settings` maps the names in `NAMES` to values (flags, possibly overridden by a config);
    `kwargs` go to `build_extractor` unchanged (chunk_size, fold_bn, ...).
    """
    from tfmet.descriptors import spec as spec_lib

    model = settings["model"]
    return spec_lib.build_extractor(
        backbone=None if model else settings["backbone"],
        weights=settings["weights"],
        model=model,
        seed=settings["seed"],
        scales=None if settings["multiscale"] else (1.0,),
        resize_method=settings["resize_method"],
        max_side=settings["max_side"],
        precision=settings["precision"],
        **kwargs,
    )
