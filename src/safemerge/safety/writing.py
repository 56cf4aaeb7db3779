"""Pieces of the safety methods' outputs: adapter side files, the full-model update of an adapter's
non-LoRA parts, model-card sections that record every parameter and every layer's decision.

Full models are written by the engine (:mod:`safemerge.safety.full_model`); everything here works
inside a temporary directory from :func:`safemerge.io.output.atomic_output`.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from safemerge.engine.tensorwise import TensorUpdate
from safemerge.errors import SafemergeError
from safemerge.io.output import TOKENIZER_FILES, md_escape
from safemerge.safety.deltas import DeltaSource
from safemerge.safety.selection import LayerScore


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16`` (``None`` stays ``None``); unknown names are a user error."""
    if name is None:
        return None
    allowed = {"float32", "float16", "bfloat16"}
    n = str(name).replace("torch.", "")
    if n not in allowed:
        raise SafemergeError(f"unsupported --dtype {name!r}", "use float32, float16 or bfloat16")
    return getattr(torch, n)


def copy_adapter_side_files(src_dir: Path, tmp: Path) -> None:
    """Copy the tokenizer files that sit next to an adapter (PEFT saves them there)."""

    for name in TOKENIZER_FILES:
        f = Path(src_dir) / name
        if f.exists():
            shutil.copyfile(f, tmp / name)


def carried_over_section(parts: dict[str, str]) -> tuple[str, str] | None:
    """Model-card section listing the fine-tuned adapter's non-LoRA parts written unchanged."""

    if not parts:
        return None
    rows = ["| tensor | part |", "|---|---|"] + [f"| {md_escape(n)} | {md_escape(k)} |" for n, k in parts.items()]
    return ("Carried over unchanged", "The fine-tuned adapter's parameters outside the LoRA product (modules_to_save, "
            "biases, trainable tokens) are the fine-tune's own and lie outside the safety subspace; they were written "
            "unchanged.\n\n" + "\n".join(rows))


def adapter_update_fn(src: DeltaSource, lora_update: TensorUpdate) -> TensorUpdate:
    """Full-model writer update: the fine-tuned adapter's non-LoRA parts, then ``lora_update``.

    ``src`` is the fine-tuned :class:`~safemerge.safety.deltas.DeltaSource`; for an adapter its
    modules_to_save/biases replace the tensor and trainable tokens overwrite their rows before the
    (merged) low-rank update is added, as ``PeftModel.merge_and_unload`` does.
    """
    adapter = getattr(src, "adapter", None)
    if adapter is None:
        return lora_update

    def update(name: str, t: torch.Tensor) -> torch.Tensor | None:
        carried = adapter.apply_non_lora(name, t)
        new = lora_update(name, t if carried is None else carried)
        return carried if new is None else new

    return update


def scores_table_markdown(scores: Iterable[LayerScore], *, decision: str = "merged") -> str:
    """Markdown table: module, layer, ρ, ‖ΔW‖_F, decision (one row per layer)."""

    rows = [f"| module | layer | ρ | ‖ΔW‖_F | {decision} |", "|---|---:|---:|---:|:---:|"]
    for s in scores:
        layer = "" if s.layer is None else str(s.layer)
        decided = "yes" if s.merged else "no"
        rows.append(f"| {md_escape(s.module)} | {layer} | {s.rho:.6f} | {s.delta_norm:.6g} | {decided} |")
    return "\n".join(rows)


def params_markdown(params: Sequence[tuple[str, Any]]) -> str:
    rows = ["| parameter | value |", "|---|---|"]
    for k, v in params:
        rows.append(f"| {md_escape(k)} | {md_escape(v)} |")
    return "\n".join(rows)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
