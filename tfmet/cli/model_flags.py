"""The descriptor-model flags shared by tfmet-extract, tfmet-extract-beam and tfmet-export.

Defined once (`tfmet.cli.settings.MODEL`: name, default, type, help) and generated here, so every
program describes the model the same way and two programs' modules can be imported in one process
(absl refuses a flag defined twice).
"""

from absl import flags

from tfmet import precision
from tfmet.cli import settings
from tfmet.cli.common import UsageError

settings.define_flags(settings.MODEL, __name__)

NAMES = settings.names(settings.MODEL)


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
