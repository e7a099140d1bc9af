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

    python -m tests.style_data pandora18k /tmp/pandora_smoke
    tfmet-train-style --config configs/pandora18k.py:smoke \
        --config.dataset.root /tmp/pandora_smoke --workdir /tmp/pandora_smoke_run
"""

import ml_collections

RESNET_V2_50_HUB = (
    "hub:https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5#preprocessing=zero_one"
)


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.dataset = dict(
        format="pandora18k",
        root="",
        list_dir="",
        classes_file="",
        csv="",
        attributes=("style",),
        stratify="style",
        split_fractions=(0.8, 0.1, 0.1),
        split_seed=0,
        split_file="",
    )
    config.model = dict(
        backbone=RESNET_V2_50_HUB,
        weights="",
        image_size=224,
        pooling="gap",
        gem_p=3.0,
        dropout=0.0,
    )
    config.train = dict(
        mode="auto",
        trainable_blocks=0,
        trainable_fraction=0.0,
        trainable_patterns=(),
        batchnorm="frozen",
        augment="none",
        epochs=100,
        batch_size=100,
        optimizer="adam",
        learning_rate=1e-3,
        schedule="constant",
        patience=10,
        seed=0,
    )
    config.eval = dict(batch_size=32)
    config.cache_dir = ""  # "" = $TFMET_CACHE_DIR or ~/.cache/tfmet

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
    elif arg not in (None, ""):
        raise ValueError(f"Unknown pandora18k config variant {arg!r}: use finetune or smoke")
    return config
