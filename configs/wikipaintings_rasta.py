"""WikiPaintings / RASTA: 25 styles, its own train/val/test split (RASTA seed).

RASTA: ResNet50 ImageNet, 224x224, global average pooling, Dense(25, softmax), RMSprop, batch 32,
the last N layers trainable; test top-1/3/5 0.494/0.771/0.874 with the last layer only,
0.615/0.851/0.931 with ~20% of the top layers retrained; predictions of an image and its mirror
image averaged ("bagging": tfmet-evaluate-style --flip_bagging).

Dataset: RASTA's folder trees `<root>/wikipaintings_{train,val,test}/<Style>/<image>` (format
"folders"), or list files `{train,val,test}.txt` of `path label` lines (format "wikipaintings",
see tfmet/data/style.py). ImageNet weights are a local `.weights.h5` file (nothing is downloaded).

Last layer only (bottleneck features, head in seconds):

    tfmet-train-style --config configs/wikipaintings_rasta.py \
        --config.dataset.root /data/wikipaintings_full \
        --config.model.weights /weights/keras_resnet50_imagenet.weights.h5 \
        --workdir runs/rasta_last_fc
    tfmet-evaluate-style --workdir runs/rasta_last_fc --split test --flip_bagging

Variants (`--config configs/wikipaintings_rasta.py:<variant>`):

    top20   the top 20% of the weight layers trainable (RASTA's best setting)
    smoke   generated list files and a tiny random backbone; runs in seconds:

    python -m tests.kit.style_data wikipaintings /tmp/rasta_smoke
    tfmet-train-style --config configs/wikipaintings_rasta.py:smoke \
        --config.dataset.root /tmp/rasta_smoke --workdir /tmp/rasta_smoke_run
"""

from tfmet.training.configs import style_config, variant


def get_config(arg=None):
    arg = variant(arg, "wikipaintings_rasta", ("top20", "smoke"))
    config = style_config()  # RASTA's own settings are the defaults: ResNet50, 224 px, RMSprop
    if arg == "top20":
        config.train.update(trainable_fraction=0.2, augment="flip", epochs=20, learning_rate=1e-4)
    elif arg == "smoke":
        config.dataset.format = "wikipaintings"
        config.model.update(backbone="resnet_tiny", image_size=32)
        config.train.update(epochs=20, batch_size=16, learning_rate=1e-2, optimizer="adam")
    return config
