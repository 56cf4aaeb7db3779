"""Merge methods as pure tensor functions registered by name (see :mod:`safemerge.methods.registry`).

``get_method``/``all_methods`` (:mod:`.catalog`) import torch and every method on first use;
``Param``/``MergeMethod`` (:mod:`.registry`) do not.
"""
from safemerge._lazy import lazy_getattr

_LAZY = {
    "get_method": "safemerge.methods.catalog",
    "all_methods": "safemerge.methods.catalog",
    "REQUIRED": "safemerge.methods.registry",
    "MergeMethod": "safemerge.methods.registry",
    "Param": "safemerge.methods.registry",
    "register": "safemerge.methods.registry",
}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
