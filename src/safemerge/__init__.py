"""safemerge: merge and fine-tune LLMs without losing their safety alignment.

The package is import-light: ``import safemerge`` does not import torch. The public
API functions and subpackages (``safemerge.api``, ``safemerge.safety.api``, ``safemerge.evaluate``)
are imported lazily on first attribute access. ``safemerge.evaluate`` is the evaluation package;
its entry point is the plain function :func:`safemerge.evaluate.api.evaluate`.
"""
from __future__ import annotations

from safemerge._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "merge": "safemerge.api",
    "merge_in_memory": "safemerge.api",
    "open_checkpoint": "safemerge.io.references",
    "load_adapter": "safemerge.io.adapter",
    "SafemergeError": "safemerge.errors",
    "RunOptions": "safemerge.options",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["__version__", "api", "evaluate", *_LAZY]
