"""The style training config: every entry with its default, in one place.

Config files (configs/pandora18k.py, configs/wikipaintings_rasta.py) start from `default_config()`
and set only what differs. The vocabulary is the one contrastive training uses where both have
the setting: `backbone`, `weights`, `image_size`, `batch_size`, `learning_rate`, `epochs`, `seed`.
"""

import math

import ml_collections

from tfmet.training.rundir import check_entries


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
        strategy="default",  # tf.distribute: default | mirrored | multi_worker (TF_CONFIG)
    )
    config.eval = dict(batch_size=32)
    config.cache_dir = ""  # "" = $TFMET_CACHE_DIR or ~/.cache/tfmet
    return config


def check_config(config):
    """Validates a style training config (ConfigDict or dict) before any work starts.

    Raises:
      ValueError naming the entry: an entry the defaults do not have (a typo), a value of the
      wrong type, or one out of its range (e.g. a learning rate that is not positive).
    """
    check_entries(config, default_config(), "style config")
    c = config.to_dict() if hasattr(config, "to_dict") else config
    model, train = c.get("model", {}), c.get("train", {})

    def need(ok, name, rule, value):
        if not ok:
            raise ValueError(f"style config entry `{name}` must be {rule}. Received: {value!r}")

    for name in ("epochs", "batch_size"):
        value = train.get(name, 1)
        need(value >= 1, f"train.{name}", "a positive integer", value)
    value = c.get("eval", {}).get("batch_size", 1)
    need(value >= 1, "eval.batch_size", "a positive integer", value)
    for name in ("patience", "trainable_blocks"):
        value = train.get(name, 0)
        need(value >= 0, f"train.{name}", "zero or more", value)
    value = train.get("learning_rate", 1e-3)
    need(math.isfinite(value) and value > 0, "train.learning_rate", "a positive number", value)
    value = train.get("trainable_fraction", 0.0)
    need(0.0 <= value <= 1.0, "train.trainable_fraction", "in [0, 1]", value)
    value = model.get("image_size", 224)
    need(16 <= value <= 4096, "model.image_size", "in [16, 4096]", value)
    value = model.get("dropout", 0.0)
    need(0.0 <= value < 1.0, "model.dropout", "in [0, 1)", value)
    value = model.get("gem_p", 3.0)
    need(math.isfinite(value) and value > 0, "model.gem_p", "a positive number", value)
    fractions = c.get("dataset", {}).get("split_fractions", (0.8, 0.1, 0.1))
    need(
        len(fractions) == 3 and min(fractions) >= 0 and abs(sum(fractions) - 1.0) < 1e-6,
        "dataset.split_fractions",
        "three non-negative fractions (train, val, test) summing to 1",
        fractions,
    )
    return config
