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

from tfmet.cli.settings import extract_config
from tfmet.training.configs import variant


def get_config(arg=None):
    arg = variant(arg, "extract_met", ("smoke",))
    # tfmet-extract's defaults (tfmet.cli.settings: ResNet-18, three scales, torch resize,
    # float32 -- "bfloat16" / "float16": docs/extraction.md); the variants change some.
    config = extract_config()
    if arg == "smoke":
        config.backbone = "resnet_tiny"
        config.mini = True
        config.splits = ("val", "test")
        config.chunk_size = 4
    return config
