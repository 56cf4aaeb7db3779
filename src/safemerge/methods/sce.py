"""SCE (Select, Calculate, Erase) merging of task vectors, from FuseChat."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import check_inputs, f32, rank_window_mask
from safemerge.methods.task_arithmetic import agrees, majority_sign_positive


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        tie_break: str = "index") -> torch.Tensor:
    """Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", Sec. 3.3 (SCE):

    * **Select**: keep the entries in the top ``select_topk`` fraction of the variance across
      the task vectors ``δᵢ = θᵢ − θ_base`` (``k = ⌊select_topk · #(var ≠ 0)⌋`` entries; none if
      ``k = 0``); the rest are zeroed in every ``δᵢ``.
    * **Calculate**: per-model weights ``ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)`` (uniform if the sum is
      below 1e-6), computed on the selected task vectors.
    * **Erase**: TIES sign election on ``Σᵢ δᵢ``; entries disagreeing with the elected sign are
      dropped; ``δ = Σᵢ ηᵢ mᵢ δᵢ / max(Σᵢ ηᵢ mᵢ, 1e-6)``; ``θ = θ_base + δ``.

    Keeps the N task vectors in one stacked tensor (the variance needs them all).
    """
    b = f32(base)
    n = len(tensors)
    if n == 0:
        return b.clone()
    tvs = torch.stack([f32(t) - b for t in tensors], dim=0)
    if select_topk < 1:
        if select_topk <= 0:
            tvs.zero_()
        else:
            var = torch.var(tvs, dim=0, correction=0)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mergekit_ties = (lambda f: torch.topk(f, k=k, largest=True).indices) if tie_break == "mergekit" else None
            keep = rank_window_mask(var, var.numel() - k, k, tie_select=mergekit_ties)
            del var
            tvs.mul_(keep)
    weights = torch.stack([tvs[i].square().mean() for i in range(n)])
    total = weights.sum().item()
    weights = torch.full_like(weights, 1.0 / n) if abs(total) < 1e-6 else weights / total
    positive = majority_sign_positive(list(tvs.unbind(0)))
    merged = torch.zeros_like(b)
    denom = torch.zeros_like(b)
    for i in range(n):
        keep = agrees(tvs[i], positive)
        ew = keep.to(torch.float32).mul_(weights[i])
        merged.add_(tvs[i] * ew)
        denom.add_(ew)
    return merged.div_(denom.clamp_(min=1e-6)).add_(b)


def sce_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
    tie_break: str = "index",
) -> torch.Tensor:
    """Registry entry for ``sce`` (base required; no per-model weights)."""
    check_inputs("sce", tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    return sce(base, tensors, select_topk=float(params.get("select_topk", 1.0)), tie_break=tie_break)
