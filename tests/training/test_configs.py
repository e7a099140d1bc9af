"""Config files share tfmet.training.configs: the variant rule and one vocabulary."""

import importlib.util
import os

import pytest

from tests.kit import REPO
from tfmet.training.configs import contrastive_config, style_config, variant
from tfmet.training.contrastive.config import _config_dict, check_config


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_rule():
    assert variant(None, "x", ("smoke",)) is None
    assert variant("", "x", ("smoke",)) is None
    assert variant("smoke", "x", ("smoke",)) == "smoke"
    with pytest.raises(ValueError, match="Unknown pandora18k config variant 'smok': use nothing "):
        variant("smok", "pandora18k", ("finetune", "smoke"))


@pytest.mark.parametrize(
    "name, bad", [("pandora18k", "x"), ("wikipaintings_rasta", "x"), ("met_contrastive_r18", "x")]
)
def test_every_config_refuses_an_unknown_variant(name, bad):
    with pytest.raises(ValueError, match=f"Unknown {name} config variant 'x'"):
        _load(name).get_config(bad)


def test_reference_names_are_aliases_of_the_shared_vocabulary():
    config = contrastive_config()
    assert (config.batch_size, config.learning_rate, config.weight_decay) == (64, 1e-7, 1e-6)
    assert (config.backbone, config.image_size) == ("resnet18", 500)
    config.net = "resnet_tiny"
    config.update({"backbone_lr": 1e-4, "wdecay": 0.0, "imsize": 32})
    assert (config.backbone, config.learning_rate) == ("resnet_tiny", 1e-4)
    assert (config.weight_decay, config.image_size) == (0.0, 32)
    config.backbone = "resnet18"
    assert config.net == "resnet18"


def test_the_batch_size_has_one_name():
    config = contrastive_config()
    assert "bsize" not in config and config.batch_size == 64
    config.bsize = 4  # a config file's old name: refused, naming the one to use
    with pytest.raises(
        ValueError,
        match=r"^contrastive config has no entry `bsize`: the batch size is `batch_size`$",
    ):
        check_config(config.to_dict())
    recorded = contrastive_config().to_dict() | {"bsize": 64}  # a run recorded before
    assert "bsize" not in _config_dict(recorded) and _config_dict(recorded)["batch_size"] == 64


def test_style_configs_set_only_what_differs_from_the_defaults():
    base = style_config()
    pandora = _load("pandora18k").get_config()
    assert pandora.dataset.format == "pandora18k" and pandora.train.batch_size == 100
    assert pandora.model.image_size == base.model.image_size == 224
    rasta = _load("wikipaintings_rasta").get_config()
    assert rasta.to_dict() == base.to_dict()  # RASTA's settings are the defaults
    smoke = _load("met_contrastive_r18").get_config("smoke")
    assert (smoke.backbone, smoke.batch_size) == ("resnet_tiny", 4)
