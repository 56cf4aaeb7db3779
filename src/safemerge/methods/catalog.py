"""Every merge method by its YAML name: mergekit's (:mod:`.builtin`) and the safety methods (:mod:`.safety`).

Importing this module registers them; :mod:`.registry` below it only defines what a method is, so
no module imports one that imports it back.
"""
from __future__ import annotations

import safemerge.methods.builtin  # noqa: F401  (registers mergekit's methods)
import safemerge.methods.nearswap  # noqa: F401  (declared with @merge_method beside its function)
import safemerge.methods.safety  # noqa: F401  (registers the safety methods)
from safemerge.errors import ConfigError
from safemerge.methods.registry import REGISTRY, MergeMethod


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; raises :class:`ConfigError` listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known methods: {', '.join(sorted(REGISTRY))}"
        raise ConfigError(f"unknown merge_method {name!r}", hint) from None


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method, by name."""
    return dict(REGISTRY)
