"""The repository's config files, loaded by path as the programs load them."""

import importlib.util
import os

from tests.kit.cli import REPO


def load_config(name, variant=None, **overrides):
    """`configs/<name>.py`'s `get_config(variant)`, with top-level entries overridden."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for key, value in overrides.items():
        config[key] = value
    return config
