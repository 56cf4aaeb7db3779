"""Every merge method by its YAML name: each is declared beside its function (``@merge_method``, or the
task-arithmetic family's table in :mod:`.task_arithmetic`); importing this module imports them all.

:mod:`.registry` below it only defines what a method is, so no module imports one that imports it back.
"""
from __future__ import annotations

# every module that declares merge methods
import safemerge.methods.arcee_fusion  # noqa: F401
import safemerge.methods.karcher  # noqa: F401
import safemerge.methods.linear  # noqa: F401
import safemerge.methods.model_stock  # noqa: F401
import safemerge.methods.multislerp  # noqa: F401
import safemerge.methods.nearswap  # noqa: F401
import safemerge.methods.ram  # noqa: F401
import safemerge.methods.safety  # noqa: F401
import safemerge.methods.sce  # noqa: F401
import safemerge.methods.slerp  # noqa: F401
import safemerge.methods.task_arithmetic  # noqa: F401
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
