"""What the config files (configs/*.py) share: the `file.py:variant` rule and the base configs.

Config files are loaded by path (`--config=configs/pandora18k.py:smoke`), not as a package, so
what they share lives here, in the library, where every config file can import it:

    from tfmet.training.configs import style_config, variant

    def get_config(arg=None):
        arg = variant(arg, "pandora18k", ("finetune", "smoke"))
        config = style_config()          # every entry with its default
        ...                              # only what differs

`get_config(arg)` receives what follows the colon (None or "" for no variant).
"""

__all__ = ["contrastive_config", "style_config", "variant"]


def contrastive_config():
    """`tfmet.training.contrastive.config.default_config()`: every entry with its default."""
    from tfmet.training.contrastive.config import default_config

    return default_config()


def style_config():
    """`tfmet.training.style.config.default_config()`: every entry with its default."""
    from tfmet.training.style.config import default_config

    return default_config()


def variant(arg, name, choices):
    """`arg` when it is one of `choices`, None when no variant was asked for.

    Raises:
      ValueError: an unknown variant, naming the config file and listing the known ones.
    """
    if arg in (None, ""):
        return None
    if arg not in choices:
        raise ValueError(
            f"Unknown {name} config variant {arg!r}: use nothing or one of {', '.join(choices)}"
        )
    return arg
