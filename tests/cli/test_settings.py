"""tfmet.cli.settings: one definition per setting -> the defaults (a ConfigDict) and the flags;
a run's settings are the defaults <- the config file <- the flags given."""

import ml_collections
import pytest
from absl import flags

from tfmet.cli import settings
from tfmet.cli.common import UsageError
from tfmet.data.limits import DEFAULT_MAX_PIXELS


def _flags(*argv):
    values = flags.FlagValues()
    settings.define_flags(settings.MODEL + settings.INPUT + settings.EXTRACT, "test", values)
    values(["prog", *argv])
    return values


def test_the_defaults_and_the_flags_come_from_one_table():
    defaults = settings.extract_config()
    values = _flags()
    names = settings.names(settings.MODEL, settings.INPUT, settings.EXTRACT)
    assert sorted(defaults.keys()) == sorted(names)
    assert (defaults.backbone, defaults.chunk_size, defaults.splits) == (
        "resnet18",
        512,
        ("train", "val", "test"),
    )
    assert defaults.max_pixels == DEFAULT_MAX_PIXELS and defaults.weights is None
    for name in names:  # every flag's default is the table's
        default = defaults[name]
        assert values[name].default == (list(default) if isinstance(default, tuple) else default)
    assert values["resize_method"].parser.enum_values == ["torch", "tf"]
    assert values.find_module_defining_flag("chunk_size") == "test"


def test_flags_given_override_the_config_file_which_overrides_the_defaults():
    file_config = ml_collections.ConfigDict({"chunk_size": 4, "backbone": "resnet_tiny"})
    values = _flags("--chunk_size=8", "--max_side=300")
    resolved = settings.resolve(settings.extract_config(), file_config, "prog", values)
    assert (resolved["chunk_size"], resolved["backbone"], resolved["max_side"]) == (
        8,
        "resnet_tiny",
        300,
    )
    assert resolved["splits"] == ["train", "val", "test"] and resolved["batch_images"] == 1
    with pytest.raises(UsageError, match=r"^config key 'chunk' is not a setting of prog$"):
        settings.resolve(settings.extract_config(), {"chunk": 4}, "prog", _flags())


def test_check_refuses_a_config_value_of_the_wrong_kind_or_choice():
    values = settings.resolve(settings.extract_config(), None, "prog", _flags())
    tables = (settings.MODEL, settings.INPUT, settings.EXTRACT)
    settings.check(values, *tables)  # the defaults pass
    for name, value, message in (
        ("chunk_size", "8", "--chunk_size must be an integer. Received: '8'"),
        ("chunk_size", True, "--chunk_size must be an integer. Received: True"),
        ("resize_method", "cubic", "--resize_method must be one of torch, tf. Received: 'cubic'"),
        ("mini", 1, "--mini must be true or false. Received: 1"),
    ):
        with pytest.raises(UsageError) as error:
            settings.check({**values, name: value}, *tables)
        assert str(error.value) == message


def test_given_is_a_flag_given_or_a_config_entry_other_than_the_default():
    defaults = settings.extract_config()
    file_config = ml_collections.ConfigDict({"chunk_size": 4, "batch_images": 1})
    values = _flags("--max_side=300")
    names = ("chunk_size", "batch_images", "max_side", "seed")
    assert [settings.given(n, defaults, file_config, values) for n in names] == [
        True,
        False,
        True,
        False,
    ]


def test_a_short_name_is_the_flags_one_letter_name():
    values = flags.FlagValues()
    table = (settings.Setting("dim", 512, int, "Dimension.", short_name="d"),)
    settings.define_flags(table, "test", values)
    values(["prog", "-d", "64"])
    assert values.dim == 64 and values["dim"].short_name == "d"
