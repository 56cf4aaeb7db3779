"""The safety LoRA that ``safemerge repair`` builds when none is given: ``train_safety_lora``.

SafeMERGE (Djuhera et al. 2025, §3) merges the task update with a **safety** update ``ΔW_s``:
a LoRA trained on the aligned model with safety data (harmful requests answered by refusals),
with the task adapter's rank and target modules so that both updates live in the same layers.
This module is the one place that builds it; :class:`SafetyLoraRecipe` holds the defaults
(steps, learning rate, batch size), so a better recipe replaces them here and every caller
(``repair``) follows. Training itself is :func:`safemerge.train.lora.train_lora` (PEFT LoRA, prompt
tokens masked, AdamW, seeded and deterministic).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError


@dataclass(frozen=True)
class SafetyLoraRecipe:
    """Training hyper-parameters of the safety LoRA (rank and targets come from the task adapter)."""

    steps: int = 80
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    seed: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_RECIPE = SafetyLoraRecipe()


def builtin_safety_records() -> list[dict[str, Any]]:
    """The built-in safety data: project-written harmful requests, each answered by a refusal.

    These are the training split of :func:`safemerge.demo.data.safety_splits`; their goals are
    disjoint from its validation split (:func:`builtin_validation_sets`) and their wording differs
    from ``builtin:harmful`` (the test set).
    """
    from safemerge.demo.data import safety_splits

    return [{"prompt": r["prompt"], "response": r["response"]} for r in safety_splits().harmful_train]


def builtin_validation_sets() -> dict[str, list[dict[str, Any]]]:
    """Built-in validation prompts for tuning τ/α: held-out harmful goals and benign look-alikes.

    Disjoint from the safety training data (whole goals held out) and written apart from the test
    sets ``builtin:harmful`` / ``builtin:benign``.
    """
    from safemerge.demo.data import safety_splits

    s = safety_splits()
    return {"harmful": list(s.harmful_val), "benign": list(s.benign_val)}


def lora_shape_of(adapter_dir: str | Path) -> tuple[int, float, list[str]]:
    """``(r, lora_alpha, target module names)`` of a PEFT LoRA adapter, for a safety LoRA of the same shape."""
    from safemerge.io.adapter import load_adapter

    ad = load_adapter(adapter_dir)
    targets = sorted({m.rsplit(".", 1)[-1] for m in ad})
    return ad.r, ad.lora_alpha, targets


def train_safety_lora(
    aligned: str | Path,
    like: str | Path,
    out: str | Path,
    *,
    data: str | Path | Iterable[Any] | None = None,
    recipe: SafetyLoraRecipe = DEFAULT_RECIPE,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train a safety LoRA on ``aligned`` with the rank, ``lora_alpha`` and targets of the adapter ``like``.

    Args:
        aligned: the aligned model directory (the task adapter's base).
        like: the task LoRA adapter whose shape is copied (SafeMERGE merges layer by layer).
        out: adapter directory (atomic; ``training_log.json`` records the loss curve).
        data: safety SFT records (JSONL path or records); default :func:`builtin_safety_records`.
        recipe: steps, learning rate, batch size, max length, seed.

    Returns ``out``.
    """
    from safemerge.train.lora import train_lora

    rank, alpha, targets = lora_shape_of(like)
    if not targets:
        raise SafemergeError(f"{like} adapts no module", "pass a trained task LoRA adapter")
    records = builtin_safety_records() if data is None else data
    return train_lora(aligned, records, out, rank=rank, alpha=alpha, targets=targets, steps=recipe.steps,
                      batch_size=recipe.batch_size, lr=recipe.lr, max_length=recipe.max_length, seed=recipe.seed,
                      force=force, progress=progress)
