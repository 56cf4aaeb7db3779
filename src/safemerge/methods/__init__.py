"""Merge methods as pure tensor functions registered by name (see :mod:`safemerge.methods.registry`)."""
from safemerge.methods.registry import REQUIRED, MergeMethod, Param, all_methods, get_method, register  # noqa: F401
