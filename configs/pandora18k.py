"""Pandora18k: 18 art movements, `<movement>/<artist>/<image>` folders (TF-Hub retrain.py seed).

The seed retrained only the last layer on cached ResNet v2 50 bottlenecks (224 px, 2000 steps of
batch 10): 63% train / 51% val. This config does the same, done right (content-hashed cache,
stratified split on disk, early stopping on validation top-1), then variants fine-tune the top
block.

Full run (the hub module must be in TFHUB_CACHE_DIR or given as a local directory):

    tfmet-train-style --config configs/pandora18k.py \
        --config.dataset.root /data/Pandora18k --workdir runs/pandora18k

Variants (`--config configs/pandora18k.py:<variant>`):

    finetune   keras.applications ResNet50 (local ImageNet weights in --config.model.weights),
               top block trainable, flips + crops
    smoke      a generated dataset, a tiny random backbone; runs in seconds:

    python -m tests.kit.style_data pandora18k /tmp/pandora_smoke
    tfmet-train-style --config configs/pandora18k.py:smoke \
        --config.dataset.root /tmp/pandora_smoke --workdir /tmp/pandora_smoke_run
"""

from tfmet.training.configs import style_config, variant

RESNET_V2_50_HUB = (
    "hub:https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5#preprocessing=zero_one"
)


def get_config(arg=None):
    arg = variant(arg, "pandora18k", ("finetune", "smoke"))
    config = style_config()
    config.dataset.format = "pandora18k"
    config.model.backbone = RESNET_V2_50_HUB
    config.train.update(epochs=100, batch_size=100, optimizer="adam", patience=10)
    if arg == "finetune":
        config.model.backbone = "keras_resnet50"
        config.train.update(
            trainable_blocks=1,
            augment="flip_crop",
            epochs=30,
            batch_size=32,
            optimizer="rmsprop",
            learning_rate=1e-4,
            patience=5,
        )
    elif arg == "smoke":
        config.model.update(backbone="resnet_tiny", image_size=32)
        config.train.update(epochs=20, batch_size=16, learning_rate=1e-2, patience=5)
    return config
