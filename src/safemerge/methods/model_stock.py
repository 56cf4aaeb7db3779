"""Model Stock: interpolate between the base and the average of the fine-tuned models, with the
ratio set by the angle between their task vectors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import ChunkedDots, dot64, f32, norm64
from safemerge.methods.blocks import TwoPassJob
from safemerge.methods.registry import Param, merge_method


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """``θ = t·θ_avg + (1 − t)·θ_base`` with ``t = N·cos θ / (1 + (N − 1)·cos θ)``.

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", Sec. 3 (the
    interpolation ratio for N fine-tuned models): ``cos θ`` is the mean pairwise cosine of the
    task vectors ``θᵢ − θ_base`` (each clamped to [−1, 1], norms products clamped at 1e-6),
    ``θ_avg = (1/N) Σᵢ θᵢ``. ``filter_wise`` computes one ``t`` per slice along the last
    dimension (per row of a matrix; a 1-D tensor is one slice) instead of one per tensor. Where
    ``|1 + (N − 1)·cos θ| < 1e-6`` there is no finite estimate and ``t = 0`` (keep the base).
    Keeps the N task vectors (needed for the pairwise cosines).
    """
    w0 = f32(base)
    shape = w0.shape
    if filter_wise:
        view = (lambda x: x.reshape(1, -1)) if w0.dim() <= 1 else (lambda x: x)
    else:
        view = lambda x: x.reshape(-1)  # noqa: E731
    b = view(w0)
    offsets = [view(f32(t)) - b for t in tensors]
    n = len(offsets)
    flat = offsets[0].dim() == 1
    # whole-tensor cosines: float64 accumulation (see dot64); per-row ones: short float32 sums
    norms = [norm64(o).float() if flat else torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    dots = {(i, j): dot64(offsets[i], offsets[j]).float() if flat else (offsets[i] * offsets[j]).sum(dim=-1)
            for i in range(n) for j in range(i + 1, n)}
    del offsets
    t = interpolation_ratio(norms, dots, n)
    return average_towards_base(tensors, b, t, view).reshape(shape)


def interpolation_ratio(norms: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """``t = N·cos θ / (1 + (N − 1)·cos θ)`` (0 where the denominator vanishes) from the task
    vectors' norms and pairwise dot products; ``cos θ`` is the mean pairwise cosine."""
    cosines = [(d / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for (i, j), d in dots.items()]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))


def average_towards_base(tensors: Sequence[torch.Tensor], b: torch.Tensor, t: torch.Tensor, view) -> torch.Tensor:  # noqa: ANN001
    """``t·θ_avg + (1 − t)·θ_base`` with ``θ_avg = (1/N) Σᵢ θᵢ`` (element-wise)."""
    avg = f32(tensors[0]).clone()
    for x in tensors[1:]:
        avg.add_(f32(x))
    avg = view(avg.div_(len(tensors)))
    return avg.mul_(t).add_(b * (1 - t))



def model_stock_two_pass(job: TwoPassJob) -> bool:
    """Model Stock of a large tensor in row blocks, bit-identical to :func:`model_stock`: pass 1
    accumulates the task vectors' norms and pairwise dot products over the same float64 chunks as
    :func:`dot64` (:class:`~safemerge.methods._tensor.ChunkedDots`), pass 2 writes
    ``t·θ_avg + (1 − t)·θ_base`` block by block. With ``filter_wise`` (one ratio per slice along
    the last dimension: per row) each block is merged on its own, in one pass."""

    n, load = job.n, job.load
    if n < 2 or len(job.shape) < 2:
        return False
    blocks = job.blocks()
    if bool(job.params.get("filter_wise", False)):
        for rows in blocks:
            job.emit(rows, model_stock(job.load_base(rows), [load(i, rows) for i in range(n)], filter_wise=True))
        return True
    pairs = [(i, i) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]
    acc = ChunkedDots(pairs)
    for rows in blocks:
        b = job.load_base(rows)
        acc.add([load(i, rows).sub_(b) for i in range(n)])
    totals = dict(zip(pairs, acc.finish()))
    norms = [totals[(i, i)].sqrt().float() for i in range(n)]
    t = interpolation_ratio(norms, {(i, j): totals[(i, j)].float() for i, j in pairs if i < j}, n)
    flatten = lambda x: x.reshape(-1)  # noqa: E731
    for rows in blocks:
        b = job.load_base(rows)
        job.emit(rows, average_towards_base([load(i, rows) for i in range(n)], flatten(b), t, flatten).view(b.shape))
    return True


@merge_method(
    "model_stock",
    params=(Param("filter_wise", False, kind=bool, help="one interpolation ratio per row instead of per tensor"),),
    base="required", min_models=2,
    reference="Jang et al. 2024, Model Stock (ECCV), Sec. 3: t = N cosθ / (1 + (N−1) cosθ), θ = t θ_avg + (1−t) "
              "θ_base",
    base_in_tensors=False,
)
def model_stock_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``model_stock`` (base + at least two models)."""
    assert base is not None
    return model_stock(base, tensors, filter_wise=bool(params.get("filter_wise", False)))
