"""Row blocks: the interface between the engine and the merge methods' kernels.

The engine (``engine/run.py``) hands a method its inputs as :class:`InputTensors` (which the method may
:func:`release` early) and gives a row-block ("two-pass") kernel (``methods/streaming.py``) one :class:`TwoPassJob`:
loaders of float32 rows (:data:`RowLoader`, :data:`BaseRowLoader`), the tensor's :func:`row_blocks` and a
:data:`BlockSink` for the merged blocks. The tensor helpers the kernels compute with stay private to the package
(:mod:`._tensor`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

TIE_BREAKS = ("index", "mergekit")
"""How exactly-equal values straddling a top-k cut-off are resolved: ``index`` (default; the
earlier flat index ranks lower — O(n), deterministic) or ``mergekit`` (the selection mergekit's
full sort makes — bit-identical to mergekit, O(n log n) on tensors that have such ties).
A field of the plan (``MergePlan.tie_break``, ``safemerge merge --mergekit-tie-break``) that the
engine passes to the methods declaring ``extra["tie_break"]``, down to :func:`rank_window_mask`."""

#: ``(first row, end row)`` of a row block of a tensor.
Rows = tuple[int, int]
#: ``load(i, rows)``: rows of input ``i`` (``None``: all of them) as a fresh float32 tensor the caller owns.
RowLoader = Callable[[int, "Rows | None"], torch.Tensor]
#: ``load_base(rows)``: rows of the base model's tensor, as :data:`RowLoader`.
BaseRowLoader = Callable[["Rows | None"], torch.Tensor]
#: ``emit(rows, block)``: takes each merged float32 row block, in row order.
BlockSink = Callable[[Rows, torch.Tensor], None]


@dataclass(frozen=True)
class TwoPassJob:
    """Everything a row-block ("two-pass") kernel (``methods/streaming.py``) gets for one tensor.

    ``load`` / ``load_base`` read float32 rows of the ``n`` inputs and of the base, ``shape`` is the
    tensor's, ``per_model`` / ``params`` the method's resolved parameters, ``block_bytes`` the float32
    size of a row block, ``emit`` takes each merged block, ``generator`` is a stochastic method's
    per-tensor generator (:mod:`safemerge.methods.seeding`; ``None`` otherwise). ``load_bf16`` /
    ``load_base_bf16``: the same rows as stored, in bfloat16, when every input and the base are stored in
    bfloat16 on the CPU and computing in float32 changes nothing else (``None`` otherwise) — for kernels
    that widen inside their own loop (:mod:`safemerge.methods._fused`) instead of reading float32 blocks."""

    load: RowLoader
    load_base: BaseRowLoader
    n: int
    shape: tuple[int, ...]
    per_model: dict[str, list[Any]]
    params: dict[str, Any]
    block_bytes: int
    emit: BlockSink
    generator: torch.Generator | None = None
    load_bf16: RowLoader | None = None
    load_base_bf16: BaseRowLoader | None = None

    def kernel_rows(self, i: int, rows: Rows) -> torch.Tensor:
        """Rows of input ``i`` for a compiled kernel that takes float32 or bfloat16: as stored when the job
        offers them (``load_bf16``), else float32."""
        return (self.load_bf16 or self.load)(i, rows)

    def kernel_base_rows(self, rows: Rows) -> torch.Tensor:
        """The base's rows for a compiled kernel, as :meth:`kernel_rows`."""
        return (self.load_base_bf16 or self.load_base)(rows)

    def blocks(self) -> list[Rows]:
        """The row blocks of the tensor, in order (:func:`row_blocks`)."""
        return row_blocks(self.shape, self.block_bytes)


#: A two-pass kernel: ``kernel(job) -> bool``; ``False`` means "not for these parameters" (the engine
#: falls back to the whole tensor, nothing emitted).
TwoPassKernel = Callable[[TwoPassJob], bool]


class InputTensors(list):
    """The engine's list of input tensors for one output tensor, handed over to the method.

    A method may drop an input it no longer needs with :func:`release`, so that peak memory
    holds task vectors *or* inputs, not both. Lists of any other type are never modified.
    """


def release(tensors: Sequence[torch.Tensor], i: int) -> None:
    """Free ``tensors[i]`` early when the caller handed ownership over (:class:`InputTensors`)."""
    if isinstance(tensors, InputTensors):
        tensors[i] = None  # type: ignore[call-overload]


def row_blocks(shape: Sequence[int], block_bytes: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of about ``block_bytes`` of float32 each, covering dimension 0."""

    rows = max(1, int(block_bytes) // (4 * math.prod(shape[1:])))
    return [(r0, min(shape[0], r0 + rows)) for r0 in range(0, shape[0], rows)]
