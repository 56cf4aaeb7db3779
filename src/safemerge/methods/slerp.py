"""Spherical linear interpolation: ``slerp`` (base ↔ one model) and ``nuslerp`` (two models,
weights → t, optionally on task vectors, per row or flattened)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from safemerge.methods._tensor import ChunkedDots, dot64, f32, norm64, per_model_list
from safemerge.methods.blocks import Rows, TwoPassJob
from safemerge.methods.mergekit_params import WEIGHT
from safemerge.methods.registry import Param, merge_method

#: |cos θ| above this → the inputs are treated as collinear and linearly interpolated.
DOT_THRESHOLD = 0.9995


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two whole tensors (flattened), Shoemake 1985, "Animating rotation with
    quaternion curves", Eq. (slerp): ``slerp(v0, v1; t) = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1``
    with ``cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩``.

    The coefficients multiply the *unnormalised* tensors (mergekit's convention). Falls back to
    ``(1−t)·v0 + t·v1`` when ``|cos Ω| > 0.9995`` (nearly collinear or antipodal). A norm
    below ``eps`` is replaced by 1. ``t = 0`` gives ``v0`` (the base), ``t = 1`` gives ``v1``.
    Norms and the dot product are accumulated in float64 (chunked, see :func:`dot64`), so the
    angle is accurate even for nearly parallel multi-million-element tensors; the only
    tensor-sized temporaries are the two scaled terms.
    """
    a, b = f32(v0), f32(v1)
    if a.numel() == 0:
        return torch.lerp(a, b, float(t))
    ca, cb = slerp_coefficients(t, norm64(a), norm64(b), dot64(a, b), dot_threshold=dot_threshold, eps=eps)
    out = a * ca
    return out.add_(b * cb)


def slerp_coefficients(t: float, na: torch.Tensor, nb: torch.Tensor, dot_ab: torch.Tensor, *,
                       dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8) -> tuple[float, float]:
    """``(sin((1−t)Ω)/sin Ω, sin(tΩ)/sin Ω)`` from the float64 norms and dot product of the two
    tensors — or ``(1−t, t)`` when ``|cos Ω| > dot_threshold`` (see :func:`slerp`)."""
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = (dot_ab / na / nb).clamp(-1, 1)
    tt = float(t)
    if dot.abs() > dot_threshold:
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - tt) * theta) / sin_theta), float(torch.sin(tt * theta) / sin_theta)



def slerp_two_pass(job: TwoPassJob) -> bool:
    """``slerp`` of a large tensor in row blocks, bit-identical to :func:`slerp`: pass 1
    accumulates ‖θ_base‖², ‖θ‖² and ⟨θ_base, θ⟩ over the same float64 chunks as :func:`dot64`
    (:class:`~safemerge.methods._tensor.ChunkedDots`), pass 2 writes ``ca·θ_base + cb·θ`` block
    by block. Memory: two float32 blocks and the output. ``False`` when not applicable."""

    if job.n != 1 or len(job.shape) < 2:
        return False
    blocks = job.blocks()
    dots = ChunkedDots([(0, 0), (1, 1), (0, 1)])
    for rows in blocks:
        dots.add([job.load_base(rows), job.load(0, rows)])
    aa, bb, ab = dots.finish()
    ca, cb = slerp_coefficients(float(job.params["t"]), aa.sqrt(), bb.sqrt(), ab)
    for rows in blocks:
        out = job.load_base(rows).mul_(ca)  # (the same products as a * ca in :func:`slerp`)
        job.emit(rows, out.add_(job.load(0, rows).mul_(cb)))
    return True


@merge_method(
    "slerp",
    params=(Param("t", low=0.0, high=1.0, help="interpolation factor: 0 = base, 1 = the other model"),),
    base="required", min_models=1, max_models=1,
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH): slerp(v0, v1; t)",
    base_in_tensors=False,
)
def slerp_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``slerp``: ``slerp(t, base, other)`` (exactly one non-base model)."""
    assert base is not None
    return slerp(float(params["t"]), base, tensors[0])


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SLERP (Shoemake 1985) applied to the whole tensor (``flatten``) or to each vector slice.

    With ``flatten=False`` every slice along the last dimension (each row of an ``[out, in]``
    matrix) is interpolated separately; with ``row_wise=True`` the slices are taken along
    dimension 0 instead (mergekit's ``nuslerp_row_wise``). Slices whose unit vectors satisfy
    ``1 − cos²Ω ≤ eps²`` are linearly interpolated. Norms are clamped at 1e-7.
    """
    a, b = f32(v0), f32(v1)
    shape = a.shape
    if flatten or a.dim() == 0:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    if a.shape[-1] == 0:
        return torch.lerp(f32(v0), f32(v1), float(t))
    ca, cb = nuslerp_coefficients(t, _slice_norm(a), _slice_norm(b), (a * b).sum(dim=-1, keepdim=True), eps=eps)
    out = a * ca
    out.add_(b * cb)
    if not flatten and row_wise and out.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape).contiguous()


def _slice_norm(a: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of every slice along the last dimension (float32), clamped at 1e-7."""
    return torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=1e-7)


def nuslerp_coefficients(t: float, na: torch.Tensor, nb: torch.Tensor, dot: torch.Tensor, *,
                         eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice, ``(sin((1−t)Ω)/sin Ω, sin(tΩ)/sin Ω)`` from the slices' norms and dot products —
    ``(1−t, t)`` where ``1 − cos²Ω ≤ eps²`` (see :func:`nuslerp`)."""
    cos = (dot / (na * nb)).clamp_(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(collinear, torch.ones_like(theta), torch.sin(theta))
    t = float(t)
    ca = torch.where(collinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(collinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return ca, cb


def nuslerp_two_pass(job: TwoPassJob) -> bool:
    """``nuslerp`` of two task vectors of a large tensor in row blocks, bit-identical to
    :func:`nuslerp_fn`. Per row (``nuslerp_flatten: false``): one pass, each block on its own (the
    slices are rows). Flattened (the default): pass 1 takes ‖a‖, ‖b‖ and Σ a⊙b of the task vectors
    over one tensor-sized float32 scratch buffer filled block by block (the float32 reductions'
    bits depend on the tensor's length, not on how it was filled), pass 2 writes ``ca·a + cb·b``
    block by block. Slices along dimension 0 (``nuslerp_row_wise``) are left to the whole tensor."""
    flatten = bool(job.params.get("nuslerp_flatten", True))
    if job.n != 2 or len(job.shape) < 2 or (not flatten and bool(job.params.get("nuslerp_row_wise", False))):
        return False
    t = nuslerp_weights_to_t(*per_model_list("nuslerp", job.per_model, "weight", 2))
    blocks = job.blocks()

    def task_vectors(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = job.load_base(rows)
        return job.load(0, rows).sub_(b), job.load(1, rows).sub_(b), b

    if not flatten:
        for rows in blocks:
            a, b, base = task_vectors(rows)
            job.emit(rows, nuslerp(t, a, b, flatten=False).add_(base))
        return True
    ca, cb = nuslerp_coefficients(t, *_flat_norms_and_dot(task_vectors, job.shape, blocks))
    for rows in blocks:
        a, b, base = task_vectors(rows)
        job.emit(rows, a.mul_(ca).add_(b.mul_(cb)).add_(base))
    return True


def _flat_norms_and_dot(task_vectors: Callable[[Rows], tuple[torch.Tensor, ...]], shape: tuple[int, ...],
                        blocks: list[Rows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``‖a‖``, ``‖b‖`` (clamped as :func:`nuslerp` clamps them) and ``Σ a⊙b`` of the flattened task
    vectors, each reduced over one tensor-sized scratch buffer filled block by block."""
    scratch = torch.empty(shape, dtype=torch.float32)
    flat = scratch.view(1, -1)
    sums = []
    for part in (lambda a, b: a, lambda a, b: b, torch.mul):
        for r0, r1 in blocks:
            a, b, _ = task_vectors((r0, r1))
            scratch[r0:r1] = part(a, b)
        sums.append(_slice_norm(flat) if len(sums) < 2 else flat.sum(dim=-1, keepdim=True))
    return sums[0], sums[1], sums[2]


def nuslerp_weights_to_t(w0: float, w1: float) -> float:
    """``t = w₁ / (w₀ + w₁)``; 0.5 when ``|w₀ + w₁| < 1e-6`` (mergekit ``nuslerp``)."""
    total = float(w0) + float(w1)
    return 0.5 if abs(total) < 1e-6 else float(w1) / total


@merge_method(
    "nuslerp",
    params=(
        WEIGHT,
        Param("nuslerp_row_wise", False, kind=bool,
              help="with nuslerp_flatten: false, interpolate slices along dim 0 instead of the last dim"),
        Param("nuslerp_flatten", True, kind=bool, help="interpolate the whole tensor as one vector"),
    ),
    base="optional", min_models=2, max_models=2,
    reference="Shoemake 1985 slerp with t = w₂/(w₁+w₂), on task vectors when a base is given (mergekit nuslerp)",
    base_in_tensors=False,
)
def nuslerp_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``nuslerp``: two models, ``t`` from their weights; with a base, SLERP
    of the task vectors ``θᵢ − θ_base`` added back to the base."""
    w = per_model_list("nuslerp", per_model, "weight", 2)
    t = nuslerp_weights_to_t(w[0], w[1])
    row_wise = bool(params.get("nuslerp_row_wise", False))
    flatten = bool(params.get("nuslerp_flatten", True))
    if base is None:
        return nuslerp(t, tensors[0], tensors[1], row_wise=row_wise, flatten=flatten)
    b = f32(base)
    out = nuslerp(t, f32(tensors[0]) - b, f32(tensors[1]) - b, row_wise=row_wise, flatten=flatten)
    return out.add_(b)

