"""What one LoRA fine-tune is: the adapter's shape and the optimisation recipe, each checked when built.

Two small frozen records, the way :class:`~safemerge.options.RunOptions` groups what every job shares:

* :class:`LoraShape` — rank ``r``, ``lora_alpha`` (the update is scaled by ``α/r``, Hu et al. 2021, LoRA,
  Eq. 3) and the target modules. ``safemerge safety-lora`` copies it from the task LoRA
  (:func:`safemerge.train.safety_lora.like_adapter_shape`), as SafeMERGE's safety LoRA must have the task
  LoRA's shape (Djuhera et al. 2025, §3).
* :class:`TrainingRecipe` — steps (or epochs), batch size, peak learning rate, tokens per example, LoRA dropout
  and compute precision of :func:`safemerge.train.lora.train_lora`.

The seed is not part of either: it is the run's, ``RunOptions.seed``. A leaf module without torch: the command
line builds both objects from its flags (a bad value is a one-line ``ConfigError`` naming the flag).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from safemerge.errors import ConfigError

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "v_proj")


def parse_targets(targets: str | Sequence[str]) -> str | list[str]:
    """``"q_proj,v_proj"`` → ``["q_proj", "v_proj"]``; ``"all-linear"`` stays a string (PEFT's keyword)."""
    if isinstance(targets, str):
        if targets.strip() == ALL_LINEAR:
            return ALL_LINEAR
        items = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        items = [str(t).strip() for t in targets if str(t).strip()]
        if items == [ALL_LINEAR]:
            return ALL_LINEAR
    if not items:
        raise ConfigError("no LoRA target modules given", "pass --targets q_proj,v_proj or --targets all-linear")
    return items


def _positive_int(value: object, name: str, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}", f"pass a positive {flag}")


@dataclass(frozen=True)
class LoraShape:
    """The adapter trained: rank ``r``, ``lora_alpha`` (scaling ``α/r``) and target modules (names such as
    ``("q_proj", "v_proj")``, ``"q_proj,v_proj"``, or ``"all-linear"``)."""

    rank: int = 8
    alpha: float = 16
    targets: str | Sequence[str] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        _positive_int(self.rank, "rank", "--rank")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}", "pass a positive --alpha")
        parse_targets(self.targets)

    @property
    def target_modules(self) -> str | list[str]:
        """PEFT's ``target_modules``: a list of names, or ``"all-linear"``."""
        return parse_targets(self.targets)


@dataclass(frozen=True)
class TrainingRecipe:
    """How the LoRA is optimised (:func:`safemerge.train.lora.train_lora`).

    Attributes:
        steps: optimiser steps; or ``epochs`` (may be fractional). Neither: one epoch.
        batch_size, lr, max_length: examples per step, peak learning rate, tokens per example.
        dropout: dropout on the LoRA input during training (PEFT's ``lora_dropout``), drawn from the seeded
            global generator, so runs stay byte-identical.
        precision: ``float32`` (``None``, the default), ``bfloat16`` (autocast) or ``"auto"`` (bf16 where the
            CPU has it natively); resolved when training starts.
        unlikelihood_weight, unlikelihood_tokens: when ``train_lora`` is given rejected answers, the step's loss is
            the answer-token cross-entropy plus ``unlikelihood_weight`` × the unlikelihood of the first
            ``unlikelihood_tokens`` tokens of a batch of rejected answers
            (:func:`safemerge.train.loss.unlikelihood_loss`); weight 0 (the default) turns the term off.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 3e-4
    max_length: int = 256
    dropout: float = 0.0
    precision: str | None = None
    unlikelihood_weight: float = 0.0
    unlikelihood_tokens: int = 4

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("--steps and --epochs are mutually exclusive", "pass only one of them")
        _positive_int(self.batch_size, "batch size", "--batch-size")
        _positive_int(self.max_length, "max length", "--max-length")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr!r}", "pass a positive --lr such as 3e-4")
        if self.steps is not None:
            _positive_int(self.steps, "steps", "--steps")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}", "pass a positive --epochs")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}", "pass e.g. --lora-dropout 0.05")
        if not (self.unlikelihood_weight >= 0 and math.isfinite(self.unlikelihood_weight)):
            raise ConfigError(f"unlikelihood weight must be ≥ 0, got {self.unlikelihood_weight!r}",
                              "pass e.g. --unlikelihood 1 (0 turns the term off)")
        _positive_int(self.unlikelihood_tokens, "unlikelihood tokens", "TrainingRecipe(unlikelihood_tokens=…)")
