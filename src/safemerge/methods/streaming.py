"""Row-block ("two-pass") kernels of methods whose result needs whole-tensor statistics.

``fn(load, load_base, n, shape, per_model, params, block_bytes, emit) -> bool``: pass 1 reads
the inputs block by block (``load(i, rows)`` / ``load_base(rows)``, float32) and gathers the
statistics (TIES thresholds, SLERP / Model Stock norms and dot products), pass 2 hands each
merged float32 block to ``emit(rows, block)``. Every kernel gives the whole-tensor function's
bits; ``False`` means "not for these parameters" and the engine falls back to the whole tensor.

TIES is declared in its registry entry (``extra["two_pass"]``); the others are listed here
until they are declared there too.
"""
from __future__ import annotations

from collections.abc import Callable

from safemerge.methods.model_stock import model_stock_two_pass
from safemerge.methods.slerp import slerp_two_pass

TWO_PASS: dict[str, Callable[..., bool]] = {
    "slerp": slerp_two_pass,
    "model_stock": model_stock_two_pass,
}
