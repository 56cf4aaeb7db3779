"""The safety core: a streamed low-rank safety subspace and the re-alignment methods built on it.

* :mod:`~safemerge.safety.subspace` — ``V_i = W_aligned,i − W_base,i`` per target weight, read
  one tensor at a time and matched by module path (SafeLoRA, Hsu et al. 2024, §3.1).
* :mod:`~safemerge.methods.similarity` — ``ρ_i = cos(C_i ΔW_i, ΔW_i)`` without forming ``C_i``.
* :mod:`~safemerge.safety.selection` — which layers are merged / projected.
* :mod:`~safemerge.safety.safemerge` — SafeMERGE (Djuhera et al. 2025).
* :mod:`~safemerge.safety.safelora` — SafeLoRA (Hsu et al. 2024).
* :mod:`~safemerge.safety.resta` — RESTA (Bhardwaj et al. 2024).
* :mod:`~safemerge.safety.mergealign` — MergeAlign (arXiv 2411.06824).
* :mod:`~safemerge.safety.api` — the public functions ``scan``, ``safemerge_adapters``,
  ``safelora``, ``resta`` and ``mergealign``.

Importing this package does not import torch.
"""
from __future__ import annotations

from safemerge._lazy import lazy_getattr

_LAZY = {
    "scan": "safemerge.safety.api",
    "safemerge_adapters": "safemerge.safety.api",
    "safelora": "safemerge.safety.api",
    "resta": "safemerge.safety.api",
    "mergealign": "safemerge.safety.api",
    "LayerScore": "safemerge.safety.selection",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
