"""Lazy package attributes: keep ``import safemerge…`` free of torch until a function is used."""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``names[attr]`` on first access of ``attr``.

    Any other public name that is a submodule of ``package`` is imported on first access, so
    ``import safemerge; safemerge.api.merge(...)`` works as it would with eager imports.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
