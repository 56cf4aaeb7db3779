"""Row-block ("two-pass") kernels of methods whose result needs whole-tensor statistics.

``kernel(job) -> bool`` with a :class:`~safemerge.methods.blocks.TwoPassJob`: pass 1 reads the
inputs block by block (``job.load(i, rows)`` / ``job.load_base(rows)``, float32) and gathers the
statistics (the TIES family's magnitude thresholds, random-generator states and L1 norms; SLERP /
Model Stock norms and dot products), pass 2 hands each merged float32 block to
``job.emit(rows, block)``; ``job.generator`` is the tensor's generator of a stochastic method. Every
kernel gives the whole-tensor function's bits; ``False`` means "not for these parameters" and the
engine falls back to the whole tensor.

The one table of such kernels, by method name (the engine looks methods up here).
"""
from __future__ import annotations

from safemerge.methods.arcee_fusion import arcee_fusion_two_pass
from safemerge.methods.blocks import TwoPassKernel
from safemerge.methods.model_stock import model_stock_two_pass
from safemerge.methods.multislerp import multislerp_two_pass
from safemerge.methods.ram import ram_two_pass
from safemerge.methods.sce import sce_two_pass
from safemerge.methods.slerp import nuslerp_two_pass, slerp_two_pass
from safemerge.methods.task_arithmetic import FAMILY
from safemerge.methods.task_arithmetic_two_pass import family_kernel

TWO_PASS: dict[str, TwoPassKernel] = {
    **{name: family_kernel(name) for name, (sparsification, *_) in FAMILY.items() if sparsification is not None},
    "slerp": slerp_two_pass,
    "model_stock": model_stock_two_pass,
    "nuslerp": nuslerp_two_pass,
    "multislerp": multislerp_two_pass,
    "ramplus_tl": ram_two_pass,
    "arcee_fusion": arcee_fusion_two_pass,
    "sce": sce_two_pass,
}
