"""Arcee Fusion: keep only the base→model changes that matter, judged per row by KL divergence.

mergekit ``arcee_fusion`` (Arcee AI, "Arcee Fusion", mergekit ≥ 0.1). For one tensor of the base
θ₀ and one other model θ₁ (softmax along the last dimension, i.e. per row):

* importance ``I = |θ₁ − θ₀| · KL(softmax(θ₁) + ε ‖ softmax(θ₀) + ε)`` (the KL of the row,
  broadcast over the row; ε = 1e-8);
* threshold ``τ = Q₂ + 1.5·(Q₃ − Q₁)`` (median plus 1.5 interquartile ranges, Tukey's outlier
  fence), with ``Q_q = sorted(I)[⌊q·(n − 1)⌋]``;
* ``θ = θ₀ + (θ₁ − θ₀) ⊙ [I ≥ τ]``.

mergekit estimates the quartiles from a random sample of 10⁶ entries when a tensor is larger;
we always take the exact order statistics (``kthvalue``, O(n)), so the result is deterministic
and equal to mergekit's wherever mergekit's is (tensors of up to 10⁶ entries). Large tensors run
in row blocks (:func:`arcee_fusion_two_pass`) with the same bits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from safemerge.methods._tensor import streamed_order_statistics
from safemerge.methods.blocks import TwoPassJob
from safemerge.methods.registry import merge_method

_KL_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|θ₁ − θ₀|`` times the row-wise KL divergence of ``softmax(θ₁)`` from ``softmax(θ₀)``."""
    p = F.softmax(other, dim=-1) + _KL_EPS
    q = F.softmax(base, dim=-1) + _KL_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence ``Q₂ + 1.5·(Q₃ − Q₁)`` of the importance scores (exact quartiles)."""
    flat = importance.reshape(-1)
    wide = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat  # exact: a widening cast
    q1, q2, q3 = (torch.kthvalue(wide, int(q * (flat.numel() - 1)) + 1).values.to(flat.dtype) for q in QUARTILES)
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``θ₀ + (θ₁ − θ₀) ⊙ [I ≥ τ]`` — see the module docstring."""
    importance = fusion_importance(other, base)
    mask = (importance >= fusion_threshold(importance)).float()  # float32 mask: mergekit's type promotion
    del importance
    return base + (other - base) * mask


def arcee_fusion_two_pass(job: TwoPassJob) -> bool:
    """:func:`arcee_fusion` of a large tensor in row blocks, bit-identical to the whole tensor: the
    importance of a row needs only that row (softmax and KL per row), so pass 1 streams it into
    exact selections of the three quartiles (:func:`~safemerge.methods._tensor.streamed_order_statistics`)
    and pass 2 recomputes it block by block to mask the task vector. Memory: a few float32 blocks,
    the selections' candidates near each quartile and the output. ``False`` (whole tensor) when a
    sample bracket missed."""
    if job.n != 1 or len(job.shape) < 2:
        return False
    blocks = job.blocks()
    numel = math.prod(job.shape)
    quartiles = streamed_order_statistics(lambda rows: fusion_importance(job.load(0, rows), job.load_base(rows)),
                                          [int(q * (numel - 1)) + 1 for q in QUARTILES], job.shape, blocks)
    if quartiles is None:
        return False
    q1, q2, q3 = quartiles
    threshold = q2 + 1.5 * (q3 - q1)
    for rows in blocks:
        base, other = job.load_base(rows), job.load(0, rows)
        mask = (fusion_importance(other, base) >= threshold).float()
        job.emit(rows, base + (other - base) * mask)
    return True


@merge_method(
    "arcee_fusion",
    base="required", min_models=1, max_models=1,
    reference="Arcee AI 2024, Arcee Fusion (mergekit): keep Δ where |Δ|·KL(softmax θ‖softmax θ₀) ≥ Q₂+1.5·IQR",
    base_in_tensors=False,
)
def arcee_fusion_fn(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                    params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Registry entry for ``arcee_fusion`` (the base + exactly one other model)."""
    assert base is not None
    return arcee_fusion(base, tensors[0])
