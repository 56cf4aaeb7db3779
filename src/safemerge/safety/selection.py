"""Per-layer scores and the layer-selection rules of SafeMERGE and SafeLoRA.

"Layer" means one adapted weight matrix (``model.layers.5.self_attn.q_proj``), not a block,
as in both reference implementations.

* SafeMERGE (Djuhera et al. 2025, §3): merge layer i iff ``ρ_i < τ`` (strict).
* SafeLoRA (Hsu et al. 2024, §3.2), threshold mode: project iff ``ρ_i ≤ τ``;
  number mode: τ_K = the K-th smallest ρ and project every ``ρ_i ≤ τ_K``
  (ties at τ_K are included, as in the reference code).

The rules and their defaults live in :mod:`safemerge.methods.safety_params`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from safemerge.methods.safety_params import (
    SAFELORA_NUM_LAYERS,
    SAFEMERGE_TAU,
    safelora_projects,
    safemerge_in_scope,
    safemerge_merges,
)


@dataclass
class LayerScore:
    """Safety similarity of one fine-tuned module.

    Attributes:
        module: full module path, e.g. ``model.layers.3.self_attn.q_proj``.
        layer: transformer-block index (``None`` outside the blocks).
        name: the module's path inside its block (``self_attn.q_proj``).
        rho: ``cos(C ΔW, ΔW)`` ∈ [0, 1].
        delta_norm: ``‖ΔW‖_F``.
        v_norm: ``‖V‖_F`` of the safety vector.
        merged: selected by the rule (merged for SafeMERGE, projected for SafeLoRA).
        source: the adapter/model the update came from.
        rank: LoRA rank (``None`` for dense updates).
    """

    module: str
    layer: int | None
    name: str
    rho: float
    delta_norm: float
    v_norm: float
    merged: bool = False
    source: str = ""
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_below(scores: list[LayerScore], tau: float, *, strict: bool = True, min_layer: int = 0) -> set[str]:
    """Modules with ``ρ < τ`` (SafeMERGE, ``strict``) or ``ρ ≤ τ`` (SafeLoRA threshold mode), in blocks
    ``≥ min_layer`` (the SafeMERGE extension :func:`~safemerge.methods.safety_params.safemerge_in_scope`; 0 = all).

    The rules are :func:`~safemerge.methods.safety_params.safemerge_merges` and
    :func:`~safemerge.methods.safety_params.safelora_projects`; ``tau`` is checked against its
    declared range [−1, 1]. Monotone in τ: raising τ never removes a module from the selection.
    """
    tau = SAFEMERGE_TAU.check(tau, "--tau")
    rule = safemerge_merges if strict else safelora_projects
    return {s.module for s in scores if rule(s.rho, tau) and safemerge_in_scope(s.layer, min_layer)}


def select_lowest(scores: list[LayerScore], k: int) -> tuple[set[str], float]:
    """SafeLoRA number mode: ``τ_K`` = K-th smallest ρ; every module with ``ρ ≤ τ_K``.

    Returns ``(modules, τ_K)``. ``k`` larger than the number of layers selects all of them.
    """
    k = SAFELORA_NUM_LAYERS.check(k, "--num-layers")
    if not scores:
        return set(), float("nan")
    rhos = sorted(s.rho for s in scores)
    tau_k = rhos[min(k, len(rhos)) - 1]
    return {s.module for s in scores if safelora_projects(s.rho, tau_k)}, tau_k


def mark(scores: list[LayerScore], selected: set[str]) -> list[LayerScore]:
    """Set ``merged`` on each score from a selection (in place; returns the list)."""
    for s in scores:
        s.merged = s.module in selected
    return scores
