"""Contrastive fine-tuning of ResNet-18 on the Met database: the reference's best recipe.

"R18-SWSL Con-Syn+Real-closest" (test GAP 36.1 with multi-scale + PCAw 512 descriptors):
`new_pos+new_neg` pairs, margin 1.8, Adam lr 1e-7, weight decay 1e-6, step decay 6 / 0.1,
10 epochs, 64 pairs a batch, 500 px crops, BatchNorm frozen. Start from SWSL weights converted
with `tfmet-convert-weights`:

    tfmet-train-contrastive --config=configs/met_contrastive_r18.py \
        --info_dir=MET/ground_truth --image_root=MET --workdir=runs/r18_swsl_closest \
        --weights=weights/resnet18_swsl.weights.h5

then extract with the trained model:

    tfmet-extract --model=runs/r18_swsl_closest/model/embedder.keras \
        --info_dir=MET/ground_truth --image_root=MET --output_dir=descriptors/r18_swsl_closest

Smoke variant (random tiny backbone, 32 px crops, 2 epochs, exact search; runs in seconds on the
tree that `tests/kit/met_tree.py` writes):

    tfmet-train-contrastive --config=configs/met_contrastive_r18.py:smoke \
        --info_dir=/tmp/met/info --image_root=/tmp/met --workdir=/tmp/met_contrastive

Flags given on the command line (`--epochs=3`, `--pairs_type=...`, or `--config.mining.pool=5`)
override the values here. See docs/contrastive.md.
"""

from tfmet.training.configs import contrastive_config as default_config
from tfmet.training.configs import variant


def get_config(arg=None):
    arg = variant(arg, "met_contrastive_r18", ("smoke",))
    config = default_config()
    config.backbone = "resnet18"
    config.pairs_type = "new_pos+new_neg"
    if arg == "smoke":
        config.backbone = "resnet_tiny"
        config.epochs = 2
        config.batch_size = 4
        config.vbsizemul = 2
        config.image_size = 32
        config.learning_rate = 1e-4
        config.sched_step = 1
        config.mining.backend = "exact"
        config.log_every_steps = 1
        config.extract_batch_images = 4
        config.num_parallel_calls = 2
        config.progress = False
    return config
