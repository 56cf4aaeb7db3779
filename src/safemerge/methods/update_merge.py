"""Merging two updates of one layer — SafeMERGE's per-layer combination (Djuhera et al. 2025, arXiv 2503.17239, §3).

For every adapted layer i with ``ρ_i < τ`` the fine-tuned update is replaced by::

    ΔW_i = α ΔW_f,i + (1 − α) ΔW_s,i                           (SafeMERGE, merge rule)

and every other layer keeps ``ΔW_f,i``. Three ways to realise it:

* ``linear`` (default) — exact and still low rank: a linear combination of LoRAs is a LoRA of
  summed rank, ``[√·]`` free: ``A' = [A_f; A_s]`` (stacked rows), ``B' = [α s_f B_f, (1−α) s_s B_s]``
  (stacked columns), so ``B'A' = α s_f B_f A_f + (1−α) s_s B_s A_s`` with rank ``r_f + r_s``.
* ``compat="reference"`` — the released code's PEFT-0.14 factor-wise mixing
  (``_generalized_task_arithmetic_weighted_adapter``): ``A' = Σ_k √(w_k s_k) A_k``,
  ``B' = Σ_k √(w_k s_k) B_k`` with ``w = (α, 1−α)`` on merged layers and ``(1, 0)`` elsewhere.
  Its product contains the cross terms ``√(w_f s_f w_s s_s)(B_f A_s + B_s A_f)``; both adapters
  must have the same rank. Use it only to reproduce published checkpoints.
* ``dare_linear`` / ``ties`` / ``dare_ties`` — the dense layer deltas are merged with the
  registered merge methods (Yu et al. 2024 DARE; Yadav et al. 2023 TIES) with weights
  ``(α, 1−α)``; the result is a dense ΔW that is written into a full model or truncated back
  to rank ``r_f + r_s`` by SVD (Eckart–Young), reporting the relative reconstruction error.
"""
from __future__ import annotations

import math

import torch

from safemerge.errors import SafemergeError
from safemerge.methods.catalog import get_method
from safemerge.methods.seeding import tensor_generator


def merge_linear_factors(A_f: torch.Tensor, sB_f: torch.Tensor, A_s: torch.Tensor, sB_s: torch.Tensor,
                         w_f: float, w_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact SafeMERGE linear merge as a LoRA of rank ``r_f + r_s``.

    Args:
        A_f, A_s: r × in down-projections; sB_f, sB_s: out × r up-projections with the LoRA
            scale already folded in (``ΔW = sB @ A``).
        w_f, w_s: weights of the fine-tuned and safety updates (SafeMERGE: α and 1−α,
            :func:`~safemerge.methods.safety_params.safemerge_weights`).

    Returns ``(A', B')`` with ``B' @ A' = w_f ΔW_f + w_s ΔW_s`` exactly (scaling 1).
    """
    A = torch.cat([A_f, A_s], dim=0)
    B = torch.cat([sB_f * w_f, sB_s * w_s], dim=1)
    return A, B


def merge_reference_factors(
    A_f: torch.Tensor, B_f: torch.Tensor, s_f: float, A_s: torch.Tensor, B_s: torch.Tensor, s_s: float,
    w_f: float, w_s: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT 0.14 ``linear`` factor-wise mixing, as the SafeMERGE reference code uses it.

    ``A' = √(w_f s_f) A_f + √(w_s s_s) A_s`` and ``B' = √(w_f s_f) B_f + √(w_s s_s) B_s``
    (unscaled factors, scales ``s = lora_alpha/r``); the result has scaling 1. Requires equal ranks.
    """
    if A_f.shape != A_s.shape or B_f.shape != B_s.shape:
        raise SafemergeError(
            f"--compat reference needs adapters of equal rank, got r_f={A_f.shape[0]} and r_s={A_s.shape[0]}",
            "PEFT's factor-wise linear merge requires one rank; drop --compat to merge exactly at rank r_f + r_s",
        )
    cf = math.sqrt(w_f * s_f)
    cs = math.sqrt(w_s * s_s)
    return A_f * cf + A_s * cs, B_f * cf + B_s * cs


def merge_dense(
    delta_f: torch.Tensor, delta_s: torch.Tensor, *, weights: tuple[float, float], strategy: str, density: float,
    module: str, seed: int | None, extra_params: dict[str, float | bool] | None = None,
) -> torch.Tensor:
    """Merge two dense layer deltas with a registered method (DARE / TIES), ``weights = (w_f, w_s)`` (SafeMERGE:
    ``(α, 1−α)``, :func:`~safemerge.methods.safety_params.safemerge_weights`).

    The method runs on a zero base, so its output *is* the merged delta. ``density`` is the
    per-model keep fraction; the RNG is the engine's for the module's weight tensor
    (:func:`~safemerge.methods.seeding.tensor_generator` of ``module.weight``).
    """
    w_f, w_s = weights
    if strategy == "linear":
        return delta_f * w_f + delta_s * w_s
    return get_method(strategy).call(
        [delta_f, delta_s],
        torch.zeros_like(delta_f),
        per_model={"weight": [w_f, w_s], "density": [density, density]},
        params=dict(extra_params or {}),
        generator=tensor_generator(seed, f"{module}.weight"),
    )


def truncate_svd(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``D`` (Eckart–Young): ``(A, B, ‖D − BA‖_F / ‖D‖_F)``.

    ``B = U_k Σ_k`` (out × k) and ``A = V_kᵀ`` (k × in); the sign of each singular pair is fixed
    (largest-|entry| of ``U`` positive) so the output is deterministic.
    """
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    k = min(rank, S.shape[0])
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(k)])
    signs[signs == 0] = 1
    U = U * signs
    Vh = Vh * signs[:, None]
    B = (U * S).float()
    A = Vh.float()
    dn = float(torch.linalg.vector_norm(D.double()))
    err = float(torch.linalg.vector_norm(D.double() - B.double() @ A.double())) / dn if dn > 0 else 0.0
    return A.contiguous(), B.contiguous(), err
