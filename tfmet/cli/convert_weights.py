"""tfmet-convert-weights: a PyTorch checkpoint -> Keras `.weights.h5` for a registered backbone.

    tfmet-convert-weights --from /ckpt/dinov2-base --arch dinov2_vitb14 --out vitb14.weights.h5
    tfmet-convert-weights --from dinov2_vitb14_pretrain.pth --arch dinov2_vitb14 --out b.weights.h5

    tfmet-convert-weights --from resnet50-0676ba61.pth --arch resnet50 --out r50.weights.h5
    tfmet-convert-weights --from met_r18_contrastive.pth --arch resnet18 --out r18_met.weights.h5 \
        --keras_model r18_met.keras

The checkpoint is read without torch and without running pickle code. torchvision, SWSL/WSL,
SwAV, SIN and EfficientNet-Lite state dicts give a backbone file
(`tfmet.backbones.get(arch, weights=...)`); the Met reference's contrastive checkpoints (GeM p,
optional projector) give an embedder file (`tfmet.descriptors.conversion.load_embedder`). Any
tensor that does not map, or Keras weight left without a tensor, is an error (exit code 2).
"""

import os

from absl import flags

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, check_outputs, no_arguments, run_program
from tfmet.cli.settings import Setting

# fmt: off
CONVERT_WEIGHTS = (
    Setting("from", None, str, "PyTorch checkpoint (.pth/.pt/.pth.tar, zip or legacy format)."),
    Setting("arch", None, str, "Registered backbone name, e.g. resnet50, efficientnet_lite0."),
    Setting("out", None, str, "Output Keras weights file; must end with .weights.h5."),
    Setting("key", None, str,
            "Entry holding the state dict, '/'-separated (default: found automatically)."),
    Setting("ignore", None, list,
            "Name prefixes that may stay unconverted (default: classifier and SwAV heads fc., "
            "_fc., projection_head., prototypes.)."),
    Setting("keras_model", None, str,
            "Also save the whole Embedder (backbone, GeM p, projector) as this .keras file, the "
            "input of tfmet-extract --model."),
    Setting("overwrite", False, bool, "Replace --out (and --keras_model) if it exists."),
)
# fmt: on
settings_lib.define_flags(CONVERT_WEIGHTS, __name__)

FLAGS = flags.FLAGS
PROGRAM = "tfmet-convert-weights"


def main(argv):
    no_arguments(argv)
    checkpoint, arch, out = FLAGS["from"].value, FLAGS.arch, FLAGS.out
    for flag, value in (("--from", checkpoint), ("--arch", arch), ("--out", out)):
        if not value:
            raise UsageError(f"{flag} is required")
    # Cheap checks first: TensorFlow is only imported once the inputs look right.
    if not os.path.exists(checkpoint):  # a file, or a ViT checkpoint directory
        raise UsageError(f"{checkpoint}: no such checkpoint file")
    if not out.endswith(".weights.h5"):
        raise UsageError(f"--out must end with .weights.h5 (Keras weights format). Received: {out}")
    check_outputs(files=("out", "keras_model"))
    keras_model = FLAGS.keras_model
    if keras_model is not None and not keras_model.endswith(".keras"):
        raise UsageError(f"--keras_model must end with .keras. Received: {keras_model}")
    for path in (out, keras_model):
        if path and os.path.exists(path) and not FLAGS.overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it")
    from tfmet import backbones
    from tfmet.backbones import torch_convert
    from tfmet.descriptors import conversion

    try:
        family = backbones.spec(arch).family
    except ValueError as e:
        raise UsageError(f"--arch: {e}") from None
    if not family.converts_state_dicts:  # a converter of the family's own (ViT checkpoints)
        if keras_model:
            raise UsageError(f"--keras_model: {arch} checkpoints hold a backbone only")
        family.convert(checkpoint, arch, out)
        print(f"Converted {checkpoint} -> {out} (backbone of {arch})")
        return
    if os.path.isdir(checkpoint):
        raise UsageError(f"{checkpoint}: a directory; --arch {arch} converts torch .pth files")
    ignore = torch_convert.DEFAULT_IGNORE if FLAGS.ignore is None else tuple(FLAGS.ignore)
    report, metadata = conversion.convert_checkpoint(
        checkpoint, arch, out, key=FLAGS.key, ignore=ignore, keras_model=keras_model
    )
    print(f"Converted {checkpoint} -> {out} ({metadata['kind']} of {arch}): {report.summary()}")
    if metadata["kind"] == "embedder":
        projector = metadata["projector_dim"]
        print(
            f"  GeM p = {metadata['p']:.4f}, projector: "
            + ("none" if projector < 0 else f"Dense({projector})")
        )
    if keras_model:
        print(f"  Embedder saved to {keras_model} (tfmet-extract --model {keras_model})")


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
