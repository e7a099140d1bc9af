"""The style training config: every entry with its default, in one place.

Config files (configs/pandora18k.py, configs/wikipaintings_rasta.py) start from `default_config()`
and set only what differs. The vocabulary is the one contrastive training uses where both have
the setting: `backbone`, `weights`, `image_size`, `batch_size`, `learning_rate`, `epochs`, `seed`.
"""

import ml_collections


def default_config():
    """A ConfigDict with the dataset, model, train and eval sections and their defaults."""
    config = ml_collections.ConfigDict()
    config.dataset = dict(
        format="folders",
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
        backbone="keras_resnet50",
        weights="",
        image_size=224,
        pooling="gap",
        gem_p=3.0,
        dropout=0.0,
        # What the backbone computes in: float32, bfloat16, or float16 (with loss scaling);
        # pooling, the heads and the loss stay float32. tfmet.backbones.precision.
        precision="float32",
    )
    config.train = dict(
        mode="auto",
        trainable_blocks=0,
        trainable_fraction=0.0,
        trainable_patterns=(),
        batchnorm="frozen",
        augment="none",
        epochs=50,
        batch_size=32,
        optimizer="rmsprop",
        learning_rate=1e-3,
        schedule="constant",
        patience=5,
        seed=0,
    )
    config.eval = dict(batch_size=32)
    config.cache_dir = ""  # "" = $TFMET_CACHE_DIR or ~/.cache/tfmet
    return config
