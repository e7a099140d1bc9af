"""The contrastive training config: reference defaults, validation, augmentation parameters.

It loads without TensorFlow (ml_collections and TF-free tfmet modules): a program checks a
config before TensorFlow loads.
"""

import dataclasses

import ml_collections

from tfmet.precision import check_precision
from tfmet.retrieval import SEARCHERS
from tfmet.training import distribute
from tfmet.training.contrastive import mining
from tfmet.training.rundir import check_entries

MARGIN = 1.8  # of the contrastive loss (`loss.contrastive_loss`), the reference's

# The reference's train_contrastive.py names of settings that have tfmet's shared name (the one
# both trainings use): `config.net = "resnet50"` and `--config.net=resnet50` set `backbone`, and
# so on. The batch size has one name only, `batch_size` (set in the config file or by
# `--config.batch_size=N`).
REFERENCE_NAMES = {
    "net": "backbone",
    "backbone_lr": "learning_rate",
    "wdecay": "weight_decay",
    "imsize": "image_size",
}


def default_config():
    """The reference's training settings (train_contrastive.py defaults), as a ConfigDict.

    Entries use tfmet's shared vocabulary where both trainings have the setting (`backbone`,
    `batch_size`, `learning_rate`, `weight_decay`, `image_size`, `seed`, `epochs`; the reference's
    `net`, `backbone_lr`, `wdecay`, `imsize` are aliases of them, `REFERENCE_NAMES`), the
    reference's names otherwise (`pairs_type`, `vbsizemul`, `margin`, `sched_step`,
    `sched_gamma`, `emb_proj`, `pca`, `mini`, `initeval`), plus tfmet's: backbone `weights`
    file, GeM `gem_p`/`train_p`, `augment`, `mining`, the validation `knn_backend`, `max_side`
    at inference, `precision` (what the backbone computes in: float32, bfloat16, float16 with
    loss scaling; GeM, L2, the projector and the loss stay float32), and run control
    (`stop_at_step`, logging, checkpoint frequency, parallelism, the tf.distribute `strategy`).
    """
    config = ml_collections.ConfigDict()
    config.backbone = "resnet18"
    config.weights = ml_collections.FieldReference(None, field_type=str)
    config.pairs_type = "sim_siam_pos+new_neg"
    config.mini = False
    config.epochs = 10
    config.batch_size = 64
    config.vbsizemul = 1
    config.learning_rate = 1e-7
    config.weight_decay = 1e-6
    config.margin = MARGIN
    config.image_size = 500
    config.sched_step = 6
    config.sched_gamma = 0.1
    config.emb_proj = False
    config.pca = False
    config.seed = 0
    config.initeval = False
    config.gem_p = 3.0
    config.train_p = True
    config.augment = ml_collections.ConfigDict(
        {
            "crop_scale": (0.7, 1.0),
            "crop_ratio": (0.99, 1.0 / 0.99),
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.4,
            "hue": 0.1,
            "jitter_prob": 0.8,
            "grayscale_prob": 0.2,
        }
    )
    config.mining = ml_collections.ConfigDict(
        {"top_k": mining.TOP_K, "pool": mining.NEGATIVE_POOL, "backend": "scann"}
    )
    config.knn_backend = "exact"
    config.max_side = ml_collections.FieldReference(None, field_type=int)
    config.stop_at_step = ml_collections.FieldReference(None, field_type=int)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 3
    config.keep_all_descriptors = False
    config.num_parallel_calls = -1
    config.extract_batch_images = 16
    config.progress = True
    config.precision = "float32"
    config.strategy = "default"
    for old, new in REFERENCE_NAMES.items():  # the reference's names stay usable as aliases
        config[old] = config.get_ref(new)
    return config


def _config_dict(config):
    """A plain dict of `config` with both names of every aliased entry (a dict written with the
    reference's names only, or tfmet's only, gets the other)."""
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if "bsize" in config and config["bsize"] == config.get("batch_size"):
        del config["bsize"]  # recorded by runs from before `batch_size` became its one name
    for old, new in REFERENCE_NAMES.items():
        if new not in config and old in config:
            config[new] = config[old]
        elif old not in config and new in config:
            config[old] = config[new]
    return config


def check_config(config):
    """Validates a training config (a ConfigDict or dict); returns it as a plain dict with both
    names of every aliased entry (`_config_dict`). Raises ValueError naming the bad entry."""
    config = _config_dict(config)
    if "bsize" in config:  # the reference's name, not an alias here: one name per setting
        raise ValueError("contrastive config has no entry `bsize`: the batch size is `batch_size`")
    check_entries(config, _config_dict(default_config()), "contrastive config")
    mining.check_pair_type(config["pairs_type"])
    for key in ("epochs", "batch_size", "vbsizemul", "image_size", "sched_step"):
        if int(config[key]) < 1:
            raise ValueError(f"config `{key}` must be a positive integer. Received: {config[key]}")
    for key in ("learning_rate", "margin"):
        if float(config[key]) <= 0:
            raise ValueError(f"config `{key}` must be positive. Received: {config[key]}")
    for key in ("weight_decay", "sched_gamma"):
        if float(config[key]) < 0:
            raise ValueError(f"config `{key}` must be non-negative. Received: {config[key]}")
    if config["pca"] and not config["emb_proj"]:
        raise ValueError("config `pca` initialises the projector: it needs `emb_proj` too")
    known = ", ".join(repr(name) for name in SEARCHERS)
    for key, value in (
        ("mining.backend", config["mining"]["backend"]),
        ("knn_backend", config["knn_backend"]),
    ):
        if value not in SEARCHERS:
            raise ValueError(f"config `{key}` must be one of {known}. Received: {value!r}")
    check_precision(config.get("precision", "float32"), "config `precision`")
    config.setdefault("strategy", "default")  # runs recorded before the entry existed
    distribute.check_strategy(config["strategy"])
    augment_config(config)  # validates the augmentation entries
    return config


def augment_config(config):
    """The `AugmentConfig` of a training config."""
    a = config["augment"]
    return AugmentConfig(
        image_size=int(config["image_size"]),
        crop_scale=tuple(a["crop_scale"]),
        crop_ratio=tuple(a["crop_ratio"]),
        brightness=float(a["brightness"]),
        contrast=float(a["contrast"]),
        saturation=float(a["saturation"]),
        hue=float(a["hue"]),
        jitter_prob=float(a["jitter_prob"]),
        grayscale_prob=float(a["grayscale_prob"]),
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the training augmentation (the reference's values by default).

    Attributes:
      image_size: side of the square output crop (`--imsize`).
      crop_scale: range of the crop area as a fraction of the image area.
      crop_ratio: range of the crop aspect ratio (width / height).
      brightness, contrast, saturation: jitter strengths s; factors ~ U[1 - s, 1 + s].
      hue: hue shift ~ U[-hue, hue] (fraction of the colour circle), at most 0.5.
      jitter_prob: probability of applying the colour jitter.
      grayscale_prob: probability of converting to grayscale (3 equal channels).
      crop_attempts: tries of the random crop before the central fallback.
    """

    image_size: int = 500
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.99, 1.0 / 0.99)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    crop_attempts: int = 10

    def __post_init__(self):
        if int(self.image_size) < 1:
            raise ValueError(f"`image_size` must be positive. Received: {self.image_size}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"`crop_scale` must satisfy 0 < low <= high <= 1. Received: {self.crop_scale}"
            )
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(
                f"`crop_ratio` must satisfy 0 < low <= high. Received: {self.crop_ratio}"
            )
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be in [0, 1]. Received: {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"`hue` must be in [0, 0.5]. Received: {self.hue}")
        for name in ("jitter_prob", "grayscale_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be in [0, 1]. Received: {getattr(self, name)}")
        if int(self.crop_attempts) < 1:
            raise ValueError(f"`crop_attempts` must be positive. Received: {self.crop_attempts}")
