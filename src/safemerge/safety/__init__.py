"""The safety core: a streamed low-rank safety subspace and the re-alignment methods built on it.

* :mod:`~safemerge.safety.subspace` — ``V_i = W_aligned,i − W_base,i`` per target weight, read
  one tensor at a time and matched by module path (SafeLoRA, Hsu et al. 2024, §3.1).
* :mod:`~safemerge.safety.deltas` — fine-tuning updates ΔW (LoRA factors or dense), per module.
* :mod:`~safemerge.safety.scoring` / :mod:`~safemerge.safety.selection` — ρ per layer; which layers
  are merged / projected (the rules: :mod:`safemerge.methods.safety_params`).
* :mod:`~safemerge.safety.merge_writer` — SafeMERGE's per-layer updates and its exact adapter writer.
* :mod:`~safemerge.safety.safelora` — SafeLoRA (Hsu et al. 2024): scoring, projection, writing.
* :mod:`~safemerge.safety.full_model` — full-model outputs as engine plans (RESTA, MergeAlign,
  SafeLoRA/SafeMERGE ``--merge-into`` and full fine-tunes).
* :mod:`~safemerge.safety.settings` — what a SafeMERGE merge reads (``SafeMergeModels``) and how it merges
  (``SafeMergeSettings``), built once by the command line.
* :mod:`~safemerge.safety.api` — the public functions ``scan``, ``safemerge_adapters``,
  ``safelora``, ``resta`` and ``mergealign``.

The per-tensor math lives with the other tensor functions: :mod:`safemerge.methods.similarity`
(ρ without forming ``C_i``), :mod:`safemerge.methods.safety` (the four methods, RESTA and
MergeAlign formulas), :mod:`safemerge.methods.update_merge` (SafeMERGE's combination of two updates).

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
    "SafeMergeModels": "safemerge.safety.settings",
    "SafeMergeSettings": "safemerge.safety.settings",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
