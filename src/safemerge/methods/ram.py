"""RAM and RAM+ (tensor-local): merging sparse reinforcement-learning task vectors.

Reinforced Agent Merging (arXiv:2601.13572; mergekit ``ram`` / ``ramplus_tl``). RL fine-tuning
changes few weights, so plain averaging dilutes every update by the number of models. RAM
separates, per entry, the models that actually changed it (``|δᵢ| > ε``):

* no model changed it → the base value;
* exactly one model changed it (*unique*) → that model's update, undiluted;
* several changed it (*shared*) → the mean of their updates.

RAM+ additionally rescales each model's unique updates by ``λᵢ = 1 + r·clip(ρᵢ, 0, α)`` with
``ρᵢ = |shared entries of i| / |unique entries of i|`` counted inside the tensor ("tensor-local").

The arithmetic follows mergekit's operation order and type promotion, so it computes in the
dtype of its inputs (float32 from the engine; the config dtype under ``--mergekit-arithmetic``).
It holds the N task vectors at once, like TIES.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import check_inputs


def _contributions(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    """Flattened task vectors with the entries ``≤ ε`` zeroed, the "changed" mask and the per-entry
    count of models that changed it (``1 × numel``)."""
    deltas = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, counts


def ram(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5,
        r: float | None = None, alpha: float = 0.2) -> torch.Tensor:
    """``θ = θ₀ + Σᵢ [uᵢ·λᵢ·δᵢ + sᵢ·δᵢ / cᵢ]`` over the entries each model changed.

    ``c`` = number of models with ``|δᵢ| > ε`` at that entry; ``u = (c == 1)``, ``s = (c > 1)``;
    ``λᵢ = 1`` (RAM) or, when ``r`` is given, ``1 + r·clip(ρᵢ, 0, α)`` (RAM+, tensor-local ρᵢ).
    """
    if not tensors:
        return base
    zeroed, changed, counts = _contributions(tensors, base, epsilon)
    shared, unique = counts > 1, counts == 1
    unique_part = zeroed * unique
    if r is not None:
        n_shared = (changed & shared).sum(dim=1)
        n_unique = (changed & unique).sum(dim=1)
        rho = n_shared / n_unique.clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (unique_part + zeroed * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram_fn(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
           params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Registry entry for ``ram``."""
    check_inputs("ram", tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    return ram(tensors, base, epsilon=float(params["epsilon"]))


def ramplus_tl_fn(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                  params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Registry entry for ``ramplus_tl``."""
    check_inputs("ramplus_tl", tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    return ram(tensors, base, epsilon=float(params["epsilon"]), r=float(params["r"]), alpha=float(params["alpha"]))
