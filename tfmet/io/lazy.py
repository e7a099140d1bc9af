"""Packages whose public names load on first use (so importing the package stays cheap)."""

import importlib


def lazy_exports(package, exports):
    """A module `__getattr__` for `package` that imports `package.<exports[name]>` on first use
    of `name` and returns that module's attribute."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
