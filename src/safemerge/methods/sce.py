"""SCE (Select, Calculate, Erase) merging of task vectors, from FuseChat."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import StreamedKth, f32, multiply_by_mask, pack_mask, rank_window_mask, unpack_mask
from safemerge.methods.blocks import Rows, TwoPassJob
from safemerge.methods.mergekit_params import INT8_MASK
from safemerge.methods.registry import Param, merge_method
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
    tensor's length, not on how it was filled). The selection (which entries survive) is found once, in
    the pass that fills model 1's squares, and kept bit-packed (1/32 of a float32 tensor): the other
    models' squares read only that model and the base, and the last pass applies the kept selection
    instead of computing the variance again. Reads: every input 3 times plus model ``i`` and the base once
    more per further model with ``select_topk < 1`` (the count, the cut, the first squares, the merge), 1
    time plus the same per model without; memory: the scratch buffer, the packed selection, a few blocks
    per model and the cut's candidates."""
    n, shape = job.n, job.shape
    if n == 0 or len(shape) < 2:
        return False
    blocks = job.blocks()
    selection = _streamed_selection(job, blocks, float(job.params.get("select_topk", 1.0)))
    scratch = torch.empty(shape, dtype=torch.float32, device=job.load_base(blocks[0]).device)
    mean_squares = []
    for i in range(n):
        for r0, r1 in blocks:
            torch.square(selection.model_block(i, (r0, r1)), out=scratch[r0:r1])
        mean_squares.append(scratch.mean())
    del scratch
    weights = calculate_weights(mean_squares)
    for rows in blocks:
        tvs, b = selection.all_models(rows)
        job.emit(rows, erase(tvs, weights, b))
    return True


class _StreamedSelection:
    """SCE's **Select** in row blocks: the task vectors of a block with the unselected entries zeroed
    (exactly as :func:`sce` zeroes them), for all models at once (:meth:`all_models`) or one model
    (:meth:`model_block`). ``window`` masks a block by the rank of its variance; ``None`` with
    ``keep_all`` (``select_topk ≥ 1``) or for none kept (``k = 0``). Model 0's pass (row blocks in
    order) computes the selection and keeps it bit-packed; every later call reuses it."""

    def __init__(self, job: TwoPassJob, blocks: list[Rows], window: RankWindow | None, keep_all: bool) -> None:
        self.job, self.window, self.keep_all = job, window, keep_all
        cols = math.prod(job.shape[1:])
        sizes = [0 if keep_all else -(-(r1 - r0) * cols // 8) for r0, r1 in blocks]
        # one allocation for every block's bits (many small long-lived ones fragment the heap)
        self.packed = dict(zip(blocks, torch.empty(sum(sizes), dtype=torch.uint8).split(sizes)))
        self.known: set[Rows] = set()

    def _task_vector(self, i: int, rows: Rows, b: torch.Tensor) -> torch.Tensor:
        return self.job.load(i, rows).sub_(b)

    def _select(self, rows: Rows, tvs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tvs`` (a block's task vectors, all models) with the unselected entries zeroed; the selection is
        computed from the variance on the block's first visit (in block order, as the rank window counts
        its ties) and kept bit-packed."""
        if self.window is None:  # nothing kept
            keep = torch.zeros(tvs[0].shape, dtype=torch.bool)
        else:
            keep = self.window.keep(_variance(tvs))
            keep = torch.ones(tvs[0].shape, dtype=torch.bool) if keep is None else keep
        self.packed[rows].copy_(pack_mask(keep))
        self.known.add(rows)
        return [multiply_by_mask(tv, keep) for tv in tvs]

    def model_block(self, i: int, rows: Rows) -> torch.Tensor:
        """Model ``i``'s selected task vector on ``rows``; reads only that model and the base once the
        block's selection is known."""
        if not self.keep_all and rows not in self.known:
            return self.all_models(rows)[0][i]
        b = self.job.load_base(rows)
        tv = self._task_vector(i, rows, b)
        # a float 0/1 mask gives the bits of multiply_by_mask's boolean one
        return tv if self.keep_all else tv.mul_(unpack_mask(self.packed[rows], tv))

    def all_models(self, rows: Rows) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every model's selected task vector on ``rows``, and the base block."""
        b = self.job.load_base(rows)
        tvs = [self._task_vector(i, rows, b) for i in range(self.job.n)]
        if self.keep_all:
            return tvs, b
        if rows not in self.known:
            return self._select(rows, tvs), b
        return [tv.mul_(unpack_mask(self.packed[rows], tv)) for tv in tvs], b


def _variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    """The per-entry variance across the task vectors, as :func:`sce` computes it."""
    return torch.var(torch.stack(tvs, dim=0), dim=0, correction=0)


def _streamed_selection(job: TwoPassJob, blocks: list[Rows], select_topk: float) -> _StreamedSelection:
    """SCE's **Select** for :func:`sce_two_pass`: the count of non-zero variances and the top-``k`` cut of
    the variance are found here (two passes over the blocks), the selection itself on first use."""

    def task_vectors(rows: Rows | None) -> list[torch.Tensor]:
        b = job.load_base(rows)
        return [job.load(i, rows).sub_(b) for i in range(job.n)]

    if select_topk >= 1:
        return _StreamedSelection(job, blocks, None, keep_all=True)
    if select_topk <= 0:
        return _StreamedSelection(job, blocks, None, keep_all=False)
    numel = math.prod(job.shape)
    k = int(sum(int(torch.count_nonzero(_variance(task_vectors(rows)))) for rows in blocks) * select_topk)
    if k == 0:
        return _StreamedSelection(job, blocks, None, keep_all=False)
    cut = None
    if k < numel:
        kth = StreamedKth(numel, numel - k + 1)
        var_rows = lambda rows: {0: _variance(task_vectors(rows))}  # noqa: E731
        bracket_from_sample(var_rows, {(0, 0): kth}, [0], job.shape, blocks[0][1] - blocks[0][0])
        for rows in blocks:
            kth.scan(var_rows(rows)[0])
        cut = streamed_cut(kth, numel - k, numel, lambda: _variance(task_vectors(None)))
    return _StreamedSelection(job, blocks, RankWindow((numel - k, numel), (cut, None)), keep_all=False)


@merge_method(
    "sce",
    params=(INT8_MASK, Param("select_topk", 1.0, low=0.0, low_open=True, high=1.0,
                             help="fraction of highest-variance entries kept, in (0, 1]")),
    base="required", min_models=0,
    reference="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, Sec. 3.3 (SCE: select, calculate, erase)",
    base_in_tensors=False, tie_break=True,
)
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
    assert base is not None
    return sce(base, tensors, select_topk=float(params.get("select_topk", 1.0)), tie_break=tie_break)
