"""Multi-scale Met descriptors with an ImageNet ResNet-18, as in the Met paper's R18-IN row.

    tfmet-extract --config=configs/extract_met.py \
        --info_dir=MET/ground_truth --image_root=MET --output_dir=descriptors/r18_in \
        --weights=weights/resnet18_imagenet.weights.h5

Smoke variant (random tiny backbone, queries only, tiny chunks; runs in seconds on the tree that
`tests/kit/met_tree.py` writes):

    tfmet-extract --config=configs/extract_met.py:smoke \
        --info_dir=/tmp/met/info --image_root=/tmp/met --output_dir=/tmp/met_desc

Command-line flags override the values here.
"""

import ml_collections

from tfmet.training.configs import variant


def get_config(arg=None):
    arg = variant(arg, "extract_met", ("smoke",))
    config = ml_collections.ConfigDict()
    config.backbone = "resnet18"
    config.weights = ml_collections.FieldReference(None, field_type=str)
    config.multiscale = True
    config.resize_method = "torch"
    config.mini = False
    config.splits = ("train", "val", "test")
    config.batch_images = 1
    config.chunk_size = 512
    config.precision = "float32"  # or "bfloat16" / "float16" (docs/extraction.md)
    if arg == "smoke":
        config.backbone = "resnet_tiny"
        config.mini = True
        config.splits = ("val", "test")
        config.chunk_size = 4
    return config
