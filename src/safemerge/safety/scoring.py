"""Score fine-tuning updates against the safety subspace in one streamed pass over V.

For every target module the safety vector ``V = W_aligned − W_base`` is read once and every
input that adapts that module is scored with ρ = cos(C ΔW, ΔW) (Hsu et al. 2024, Eq. 2):
low-rank traces for adapters, the dense projection for full fine-tunes
(:mod:`safemerge.methods.similarity`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from safemerge.errors import SafemergeError
from safemerge.io.checkpoint import split_layer_name
from safemerge.methods.similarity import V_NORM_EPS, rho_dense, rho_lowrank
from safemerge.safety.deltas import DeltaSource, module_sort_key
from safemerge.safety.selection import LayerScore
from safemerge.safety.subspace import SafetySubspace


def block_name(module: str) -> tuple[int | None, str]:
    parts = split_layer_name(module + ".weight")
    if parts is None:
        return None, module
    return parts[1], parts[2][: -len(".weight")]


def delta_norm_lowrank(A: torch.Tensor, sB: torch.Tensor) -> float:
    """``‖sBA‖_F = sqrt(tr(BᵀB · AAᵀ))`` (r × r; Hu et al. 2021 factors)."""
    a = A.double()
    b = sB.double()
    val = float(((b.T @ b) * (a @ a.T)).sum())  # tr(XY) = Σ X∘Yᵀ and AAᵀ is symmetric
    return max(val, 0.0) ** 0.5


def score_sources(
    subspace: SafetySubspace,
    sources: Sequence[DeltaSource],
    *,
    on_module: Callable[[str], None] | None = None,
) -> list[list[LayerScore]]:
    """ρ for every module of every source, reading each ``V_i`` once.

    Returns one list of :class:`LayerScore` per source, in model order (block, then name).
    ``on_module`` is called after each module (progress reporting).
    """
    modules = sorted({m for s in sources for m in s.modules}, key=module_sort_key)
    members = [set(s.modules) for s in sources]
    results: list[list[LayerScore]] = [[] for _ in sources]
    for module in modules:
        sv = subspace.vector(module)
        if sv.norm < V_NORM_EPS:
            raise SafemergeError(
                f"the safety vector of {module} is zero: --base and --aligned hold the same {sv.weight}",
                "--base must be the unaligned model and --aligned the safety-aligned one; "
                "or leave this module out with --targets",
            )
        layer, name = block_name(module)
        for i, src in enumerate(sources):
            if module not in members[i]:
                continue
            lr = src.lowrank(module)
            if lr is not None:
                A, sB = lr
                rho = rho_lowrank(sv.V, A, sB, v_norm=sv.norm)
                dn = delta_norm_lowrank(A, sB)
            else:
                D = src.dense(module)
                rho = rho_dense(sv.V, D, v_norm=sv.norm)
                dn = float(torch.linalg.vector_norm(D))
                del D
            results[i].append(
                LayerScore(module=module, layer=layer, name=name, rho=rho, delta_norm=dn, v_norm=sv.norm,
                           source=src.label, rank=src.rank(module))
            )
        del sv
        if on_module is not None:
            on_module(module)
    return results
