"""Safety similarity ρ = cos(vec(C ΔW), vec(ΔW)) with ``C = V Vᵀ / ‖V‖_F`` — without forming C.

SafeLoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833, §3.1–3.2) defines the per-layer
"alignment matrix" ``C_i = V_i V_iᵀ / ‖V_i‖_F`` from the alignment vector
``V_i = W_aligned,i − W_base,i`` and scores a fine-tuning update by the cosine between
``C_i ΔW_i`` and ``ΔW_i``; SafeMERGE (Djuhera et al. 2025, arXiv 2503.17239) reuses the same
score to pick the layers it merges. ``C`` is out × out (e.g. 14336² floats = 822 MB for a
Llama-3.1-8B ``gate_proj``), so this module never builds it:

* **LoRA update** ``ΔW = s·B A`` (B: out × r, A: r × in). With ``P = Vᵀ B`` (in × r) and
  ``Q = V P`` (out × r)::

      ⟨CΔW, ΔW⟩ = s²·tr(PᵀP · AAᵀ) / ‖V‖_F
      ‖CΔW‖²    = s²·tr(QᵀQ · AAᵀ) / ‖V‖_F²
      ‖ΔW‖²     = s²·tr(BᵀB · AAᵀ)

  — three traces of r × r products; cost O(out·in·r), memory O((out + in)·r).
* **Dense update** (full fine-tunes): ``CΔW = V (VᵀΔW) / ‖V‖_F`` or, when ``out < in``,
  ``(V Vᵀ) ΔW / ‖V‖_F``; the intermediate is min(out, in)², never max(out, in)².

``⟨CΔW, ΔW⟩ = ‖VᵀΔW‖²/‖V‖_F ≥ 0``, so ρ ∈ [0, 1]. The reference code sets ``C = 0`` when
``‖V‖_F < 1e-9``; then (and when ``ΔW = 0``) ρ is defined as 0.
"""
from __future__ import annotations

import torch

V_NORM_EPS = 1e-9
"""Below this ‖V‖_F the layer has no safety direction (the reference code's C = 0 rule)."""


def _trace_prod(x: torch.Tensor, y: torch.Tensor) -> float:
    """``tr(X Y)`` for square X, Y without forming the product: ``Σ_ij X_ij Y_ji`` (float64)."""
    return float((x.double() * y.double().T).sum())


def _cosine(inner: float, proj_sq: float, delta_sq: float) -> float:
    if proj_sq <= 0.0 or delta_sq <= 0.0:
        return 0.0
    rho = inner / ((proj_sq ** 0.5) * (delta_sq ** 0.5))
    return float(min(1.0, max(-1.0, rho)))


def rho_lowrank(V: torch.Tensor, A: torch.Tensor, B: torch.Tensor, v_norm: float | None = None) -> float:
    """SafeLoRA/SafeMERGE similarity of a LoRA update ``ΔW ∝ B A`` (Hsu et al. 2024, Eq. 2).

    Computes ``cos(vec(C B A), vec(B A))`` with ``C = V Vᵀ/‖V‖_F`` through r × r traces
    (module docstring). The LoRA scale ``s`` cancels in a cosine, so pass unscaled or scaled
    factors alike.

    Args:
        V: alignment vector, out × in (float32).
        A: r × in.  B: out × r.
        v_norm: ``‖V‖_F`` if already known.
    """
    vn = float(torch.linalg.vector_norm(V)) if v_norm is None else float(v_norm)
    if vn < V_NORM_EPS:
        return 0.0
    A = A.to(V.dtype)
    B = B.to(V.dtype)
    P = (B.T @ V).T  # in × r  (= Vᵀ B; this order avoids a transposed GEMM over V)
    Q = V @ P  # out × r
    gram_a = (A.double() @ A.double().T)  # r × r
    inner = _trace_prod(P.T @ P, gram_a) / vn
    proj_sq = _trace_prod(Q.T @ Q, gram_a) / (vn * vn)
    delta_sq = _trace_prod(B.T @ B, gram_a)
    return _cosine(inner, proj_sq, delta_sq)


def project_dense(V: torch.Tensor, D: torch.Tensor, v_norm: float | None = None) -> torch.Tensor:
    """``C D = V Vᵀ D / ‖V‖_F`` choosing the cheaper association (never a max(out,in)² matrix).

    Used for SafeLoRA's ``B ← C B`` (D = B, out × r: ``V (Vᵀ B)``, O(out·in·r)) and for dense
    full-fine-tune deltas. Returns zeros when ``‖V‖_F < 1e-9`` (the reference's C = 0 rule).
    """
    vn = float(torch.linalg.vector_norm(V)) if v_norm is None else float(v_norm)
    if vn < V_NORM_EPS:
        return torch.zeros_like(D)
    out_dim, in_dim = V.shape
    cols = D.shape[1]
    # cost of V (Vᵀ D): 2·out·in·cols ; cost of (V Vᵀ) D: out²·in + out²·cols
    if 2 * out_dim * in_dim * cols <= out_dim * out_dim * (in_dim + cols):
        return (V @ (V.T @ D)) / vn
    return ((V @ V.T) @ D) / vn


def rho_dense(V: torch.Tensor, D: torch.Tensor, v_norm: float | None = None) -> float:
    """Similarity of a dense update ``D = ΔW`` (full fine-tune): ``cos(V(VᵀD)/‖V‖_F, D)``.

    Uses ``⟨CD, D⟩ = ‖VᵀD‖²/‖V‖_F`` and ``‖CD‖`` from :func:`project_dense`; the largest
    intermediate is min(out, in)².
    """
    vn = float(torch.linalg.vector_norm(V)) if v_norm is None else float(v_norm)
    if vn < V_NORM_EPS:
        return 0.0
    D = D.to(V.dtype)
    out_dim, in_dim = V.shape
    if in_dim <= out_dim:
        M = V.T @ D  # in × in
        inner = float(torch.linalg.vector_norm(M.double()) ** 2) / vn
        proj = (V @ M) / vn
    else:
        G = V @ V.T  # out × out (= ‖V‖·C, out < in)
        proj = (G @ D) / vn
        inner = float((proj.double() * D.double()).sum())
    proj_sq = float(torch.linalg.vector_norm(proj.double()) ** 2)
    delta_sq = float(torch.linalg.vector_norm(D.double()) ** 2)
    return _cosine(inner, proj_sq, delta_sq)


def rho_materialized(V: torch.Tensor, D: torch.Tensor) -> float:
    """The reference implementation: materialise ``C = V Vᵀ/‖V‖_F`` (out × out), then cosine.

    This is what the SafeLoRA and SafeMERGE reference code does
    (``compute_safelora_projection_matrices`` + ``compute_safelora_cos``). Kept only as the
    oracle for tests and the baseline for ``bench/safety_speed.py``; never used by the tool.
    """
    vn = float(torch.linalg.vector_norm(V))
    if vn < V_NORM_EPS:
        C = torch.zeros(V.shape[0], V.shape[0], dtype=V.dtype)
    else:
        C = (V @ V.T) / vn
    proj = C @ D.to(V.dtype)
    return float(torch.nn.functional.cosine_similarity(proj.reshape(1, -1), D.to(V.dtype).reshape(1, -1)).item())
