"""SCE (Select, Calculate, Erase) merging of task vectors, from FuseChat."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from safemerge.methods._tensor import (
    Rows,
    StreamedKth,
    TwoPassJob,
    check_inputs,
    f32,
    multiply_by_mask,
    rank_window_mask,
)
from safemerge.methods.task_arithmetic import agrees, majority_sign_positive
from safemerge.methods.task_arithmetic_two_pass import RankWindow, bracket_from_sample, streamed_cut


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
    weights = calculate_weights([tvs[i].square().mean() for i in range(n)])
    return erase(list(tvs.unbind(0)), weights, b)


def calculate_weights(mean_squares: Sequence[torch.Tensor]) -> torch.Tensor:
    """SCE's **Calculate**: ``ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)`` from the means (uniform if the sum is below 1e-6)."""
    weights = torch.stack(list(mean_squares))
    total = weights.sum().item()
    return torch.full_like(weights, 1.0 / len(mean_squares)) if abs(total) < 1e-6 else weights / total


def erase(tvs: list[torch.Tensor], weights: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SCE's **Erase** (per entry, so for a whole tensor or a row block alike): the TIES sign election on
    ``Σᵢ δᵢ``, then ``θ_base + Σᵢ ηᵢ mᵢ δᵢ / max(Σᵢ ηᵢ mᵢ, 1e-6)`` over the agreeing entries."""
    positive = majority_sign_positive(tvs)
    merged = torch.zeros_like(b)
    denom = torch.zeros_like(b)
    for i, tv in enumerate(tvs):
        keep = agrees(tv, positive)
        ew = keep.to(torch.float32).mul_(weights[i])
        merged.add_(tv * ew)
        denom.add_(ew)
    return merged.div_(denom.clamp_(min=1e-6)).add_(b)


def sce_two_pass(job: TwoPassJob) -> bool:
    """:func:`sce` of a large tensor in row blocks, bit-identical to the whole tensor. The variance across
    the task vectors and the sign election are per entry, so a block computes them as the whole tensor
    does; what needs the whole tensor is streamed: the number of non-zero variances (an integer count),
    the top-``k`` cut of the variance (:class:`~safemerge.methods._tensor.StreamedKth`, ties by flat index
    as :func:`~safemerge.methods._tensor.rank_window_mask` orders them) and each ``mean(δᵢ²)``, a float32
    mean over one tensor-sized scratch buffer filled block by block (a reduction's bits depend on the
    tensor's length, not on how it was filled). Reads every input ``n + 1`` times (``n + 3`` with
    ``select_topk < 1``); memory: the scratch buffer, a few blocks per model and the cut's candidates."""
    n, shape = job.n, job.shape
    if n == 0 or len(shape) < 2:
        return False
    blocks = job.blocks()
    select = _streamed_selection(job, blocks, float(job.params.get("select_topk", 1.0)))
    scratch = torch.empty(shape, dtype=torch.float32, device=job.load_base(blocks[0]).device)
    mean_squares = []
    for i in range(n):
        selected = select()
        for r0, r1 in blocks:
            torch.square(selected((r0, r1))[0][i], out=scratch[r0:r1])
        mean_squares.append(scratch.mean())
    del scratch
    weights = calculate_weights(mean_squares)
    selected = select()
    for rows in blocks:
        tvs, b = selected(rows)
        job.emit(rows, erase(tvs, weights, b))
    return True


SelectedRows = Callable[[Rows], tuple[list[torch.Tensor], torch.Tensor]]


def _streamed_selection(job: TwoPassJob, blocks: list[Rows], select_topk: float) -> Callable[[], SelectedRows]:
    """SCE's **Select** in row blocks: a factory of one pass over the blocks (in order), each call
    ``selected(rows)`` returning the block's task vectors with the unselected entries zeroed (exactly as
    :func:`sce` zeroes them) and the base block. The cut is found here, once."""

    def task_vectors(rows: Rows) -> tuple[list[torch.Tensor], torch.Tensor]:
        b = job.load_base(rows)
        return [job.load(i, rows).sub_(b) for i in range(job.n)], b

    if select_topk >= 1:
        return lambda: task_vectors
    if select_topk <= 0:
        def zeroed(rows: Rows) -> tuple[list[torch.Tensor], torch.Tensor]:
            tvs, b = task_vectors(rows)
            return [tv.zero_() for tv in tvs], b

        return lambda: zeroed
    variance = lambda tvs: torch.var(torch.stack(tvs, dim=0), dim=0, correction=0)  # noqa: E731
    numel = math.prod(job.shape)
    k = int(sum(int(torch.count_nonzero(variance(task_vectors(rows)[0]))) for rows in blocks) * select_topk)
    cut = None
    if 0 < k < numel:
        kth = StreamedKth(numel, numel - k + 1)
        var_rows = lambda rows: {0: variance(task_vectors(rows)[0])}  # noqa: E731
        bracket_from_sample(var_rows, {(0, 0): kth}, [0], job.shape, blocks[0][1] - blocks[0][0])
        for rows in blocks:
            kth.scan(var_rows(rows)[0])
        cut = streamed_cut(kth, numel - k, numel, lambda: variance(task_vectors(None)[0]))

    def one_pass() -> SelectedRows:
        window = RankWindow((numel - k, numel), (cut, None))

        def selected(rows: Rows) -> tuple[list[torch.Tensor], torch.Tensor]:
            tvs, b = task_vectors(rows)
            keep = window.keep(variance(tvs)) if k > 0 else torch.zeros(tvs[0].shape, dtype=torch.bool)
            return (tvs if keep is None else [multiply_by_mask(tv, keep) for tv in tvs]), b

        return selected

    return one_pass


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
