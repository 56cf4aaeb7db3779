"""Per-layer scores and the layer-selection rules of SafeMERGE and SafeLoRA.

"Layer" means one adapted weight matrix (``model.layers.5.self_attn.q_proj``), not a block,
as in both reference implementations.

* SafeMERGE (Djuhera et al. 2025, §3): merge layer i iff ``ρ_i < τ`` (strict), default τ = 0.35.
* SafeLoRA (Hsu et al. 2024, §3.2), threshold mode: project iff ``ρ_i ≤ τ`` (default 0.5);
  number mode: τ_K = the K-th smallest ρ (default K = 10) and project every ``ρ_i ≤ τ_K``
  (ties at τ_K are included, as in the reference code).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from safemerge.errors import ConfigError


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


def check_tau(tau: float, *, flag: str = "--tau") -> float:
    """τ must be a finite number in [−1, 1] (a cosine)."""
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {tau!r}", "use a value in [-1, 1], e.g. 0.35") from None
    if not -1.0 <= t <= 1.0:  # also rejects NaN
        raise ConfigError(f"{flag} = {tau!r} is outside [-1, 1]", "ρ is a cosine; use a value in [-1, 1], e.g. 0.35")
    return t


def check_unit(value: float, flag: str, example: str) -> float:
    """A weight in [0, 1] (α of SafeMERGE, DARE density …)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {value!r}", f"use a value in [0, 1], e.g. {example}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{flag} = {value!r} is outside [0, 1]", f"use a value in [0, 1], e.g. {example}")
    return v


def select_below(scores: list[LayerScore], tau: float, *, strict: bool = True) -> set[str]:
    """Modules with ``ρ < τ`` (SafeMERGE, ``strict``) or ``ρ ≤ τ`` (SafeLoRA threshold mode).

    Monotone in τ: raising τ never removes a module from the selection.
    """
    tau = check_tau(tau)
    return {s.module for s in scores if (s.rho < tau if strict else s.rho <= tau)}


def select_lowest(scores: list[LayerScore], k: int) -> tuple[set[str], float]:
    """SafeLoRA number mode: ``τ_K`` = K-th smallest ρ; every module with ``ρ ≤ τ_K``.

    Returns ``(modules, τ_K)``. ``k`` larger than the number of layers selects all of them.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"--num-layers must be a positive integer, got {k!r}", "e.g. --num-layers 10")
    if not scores:
        return set(), float("nan")
    rhos = sorted(s.rho for s in scores)
    tau_k = rhos[min(k, len(rhos)) - 1]
    return {s.module for s in scores if s.rho <= tau_k}, tau_k


def mark(scores: list[LayerScore], selected: set[str]) -> list[LayerScore]:
    """Set ``merged`` on each score from a selection (in place; returns the list)."""
    for s in scores:
        s.merged = s.module in selected
    return scores
