"""The parameters several of mergekit's merge methods share, declared once.

Names, scopes (per-model vs global), defaults and required-ness are those of mergekit 0.1.5
(``mergekit/merge_methods/*.py``). mergekit declares no numeric ranges; the bounds here
(density ∈ (0, 1], γ ∈ [0, 1], …) are ours, so bad values fail at config time with a hint
instead of producing NaNs. Each method declares its own parameters beside its function with
:func:`~safemerge.methods.registry.merge_method`; see ``docs/methods.md`` for how the engine passes the base model.

Torch-free, like :mod:`.registry`.
"""
from __future__ import annotations

from safemerge.methods.registry import Param

WEIGHT = Param("weight", per_model=True, help="per-model weight, e.g. parameters: {weight: 0.5}")
DENSITY = Param("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0,
                help="fraction of each task vector to keep, in (0, 1]")
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0,
              help="fraction of the largest-magnitude entries removed as outliers, in [0, 1]")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0,
                help="keep-probability spread; density ± epsilon must stay inside (0, 1)")
LAMBDA = Param("lambda", 1.0, help="scale of the merged task vector")
INT8_MASK = Param("int8_mask", False, kind=bool, help="store sign masks as int8 (memory only; no numerical effect)")


def normalize_param(default: bool) -> Param:
    """``normalize``: divide by the sum of the (agreeing) weights; its default differs between methods."""
    return Param("normalize", default, kind=bool, help="divide by the sum of the (agreeing) weights")


def rescale_param(default: bool) -> Param:
    """``rescale``: rescale sparsified task vectors to their L1 norm; its default differs between methods."""
    return Param("rescale", default, kind=bool, help="rescale sparsified task vectors to their original L1 norm")
