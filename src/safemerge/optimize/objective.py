"""The safety-aware merging objective: answer-token cross-entropy on D_safety and D_expert.

Hammoud et al. 2024 ("One bad model spoils the bunch", arXiv 2406.14563), §4.4, Eq. 4–5:

    L_D(θ)     = E_{(q,a)∼D} [ CE(f_θ(q), a) ]          (mean answer-token CE, prompt masked)
    L_merge(θ) = L_safety(θ) + α · L_expert(θ)            (α = 0.3 by default)

**Deviation, opt-in** (``objective.safety_tokens: K``): L_safety over the first ``K`` answer tokens of each
D_safety example. A refusal is decided in its first tokens; averaged over a 60-token refusal the decision is
diluted by text any model predicts. Measured on the issue-15 pool (SmolLM2-135M, 24 D_safety examples,
aligned / domain expert / bad expert, 98.8% / 47.5% / 3.7% safe): all answer tokens 0.686 / 0.692 / 0.799,
the first 4 tokens 0.242 / 0.536 / 1.298. Default ``None``: every answer token, as the paper.

Eq. 4 is printed as E[−L_ce]; like the authors' code we minimise the mean CE. Each example is
rendered with the model's chat template (user = q, assistant = a) by
:func:`safemerge.train.tokenize.encode_chat_example`; prompt tokens carry label −100. The
per-example loss is the mean over its answer tokens (Hugging Face's mean-token CE, as in the
authors' ``helpers.py``) and ``L_D`` is the mean over examples, so the value does not depend on
the batch size or padding. When one of the two sets is empty, ``L_merge`` is the loss on the
other set alone (so LM-Cocktail on D_expert uses ``softmax(−L_expert/T)``).

The sample is fixed: :func:`sample_records` draws it once with a seeded RNG and every candidate is
scored on the same examples in the same batches.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from safemerge.errors import SafemergeError
from safemerge.train.tokenize import collate, encode_chat_example

IGNORE_INDEX = -100


def sample_records(records: Sequence[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """A fixed sample of ``n`` records (all when ``n`` is ``None`` or ≥ len), drawn with ``random.Random(seed)``.

    The sample keeps the records' original order so it does not depend on how they were drawn.
    """
    recs = list(records)
    if n is None or n >= len(recs):
        return recs
    idx = sorted(random.Random(seed).sample(range(len(recs)), n))
    return [recs[i] for i in idx]


def _pairs(records: Sequence[dict[str, Any]], where: str) -> list[tuple[str, str]]:
    out = []
    for i, r in enumerate(records):
        p = r.get("prompt", r.get("question", r.get("instruction")))
        a = r.get("response", r.get("answer", r.get("output")))
        if not isinstance(p, str) or not isinstance(a, str) or not a.strip():
            raise SafemergeError(f"{where}: record {i} needs non-empty 'prompt' and 'response' strings",
                                 "use the JSONL written by `safemerge synth` ({prompt, response, type, ...})")
        out.append((p, a))
    return out


def first_answer_tokens(example: dict[str, Any], k: int) -> dict[str, Any]:
    """``example`` cut after its ``k``-th answer token: the loss covers the first ``k`` answer tokens only, and
    the tokens after them are not computed at all."""
    answer = [i for i, lab in enumerate(example["labels"]) if lab != IGNORE_INDEX]
    if len(answer) <= k:
        return example
    end = answer[k - 1] + 1
    return {**example, "input_ids": example["input_ids"][:end], "labels": example["labels"][:end]}


@dataclass
class LossParts:
    """One evaluation of the objective."""

    loss: float
    safety: float | None
    expert: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "safety_loss": self.safety, "expert_loss": self.expert}


class AnswerCEObjective:
    """``L = L_safety + α·L_expert`` on fixed, pre-tokenised, pre-batched samples (§4.4, Eq. 5).

    Args:
        tokenizer: the tokenizer whose chat template renders the examples.
        safety: D_safety records (``prompt``/``response``).
        expert: D_expert records.
        alpha: weight α of the expert term (paper default 0.3).
        batch_size: examples per forward pass.
        max_length: token budget per example (see ``encode_chat_example``).
    """

    def __init__(self, tokenizer: Any, safety: Sequence[dict[str, Any]], expert: Sequence[dict[str, Any]], *,
                 alpha: float = 0.3, batch_size: int = 8, max_length: int = 512,
                 safety_tokens: int | None = None) -> None:

        if not safety and not expert:
            raise SafemergeError("the objective has no data", "give data.safety and/or data.expert files with records")
        if alpha < 0:
            raise SafemergeError(f"objective.alpha must be ≥ 0, got {alpha}", "the paper uses alpha: 0.3")
        if batch_size < 1:
            raise SafemergeError(f"objective.batch_size must be ≥ 1, got {batch_size}", "use a positive batch size")
        if safety_tokens is not None and safety_tokens < 1:
            raise SafemergeError(f"objective.safety_tokens must be ≥ 1, got {safety_tokens}",
                                 "use null for the whole answer (the paper's Eq. 4) or a small count such as 4")
        self.alpha = float(alpha)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.n_safety, self.n_expert = len(safety), len(expert)
        self._batches: dict[str, list[dict[str, Any]]] = {}
        for part, recs in (("safety", safety), ("expert", expert)):
            enc = [encode_chat_example(tokenizer, p, a, max_length=max_length) for p, a in _pairs(recs, f"data.{part}")]
            if part == "safety" and safety_tokens is not None:
                enc = [first_answer_tokens(e, safety_tokens) for e in enc]
            for i, e in enumerate(enc):
                if not any(lab != IGNORE_INDEX for lab in e["labels"][1:]):
                    raise SafemergeError(f"data.{part}: record {i} has no answer tokens after truncation",
                                         "raise objective.max_length or shorten the prompt")
            # batches of similar length waste little on padding; L_D is a mean over examples, so order is free
            enc.sort(key=lambda e: len(e["input_ids"]))
            self._batches[part] = [collate(enc[i:i + batch_size], pad) for i in range(0, len(enc), batch_size)]

    @staticmethod
    def per_example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean answer-token CE of each example of a right-padded batch, shape ``(batch,)``.

        ``ℓ_i = (1/|A_i|) Σ_{t∈A_i} −log p_θ(x_{i,t} | x_{i,<t})`` with ``A_i`` the labelled positions.
        Logits are computed only from the position before the batch's first answer token on
        (``logits_to_keep``): the prompt positions never enter the loss, and the vocabulary projection
        of a 135M model is a fifth of its compute per position.
        """

        dev = next(model.parameters()).device
        ids = batch["input_ids"].to(dev)
        mask = batch["attention_mask"].to(dev)
        labels = batch["labels"].to(dev)
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        first = max(1, int(labelled[0])) if labelled.numel() else ids.shape[1] - 1
        keep = ids.shape[1] - first + 1  # logits of positions first-1 … T-1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, first:]
        valid = shift_labels != IGNORE_INDEX
        tok = torch.zeros(shift_labels.shape, dtype=torch.float32, device=dev)
        tok[valid] = F.cross_entropy(shift_logits[valid], shift_labels[valid], reduction="none")
        return tok.sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(tok.dtype)

    def part_loss(self, model: Any, part: str) -> float | None:
        """``L_D`` for ``part`` ∈ {``safety``, ``expert``}: mean of the per-example losses, or ``None`` if empty."""

        batches = self._batches[part]
        if not batches:
            return None
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                losses = self.per_example_losses(model, b)
                total += float(losses.double().sum())
                count += int(losses.numel())
        return total / count

    def __call__(self, model: Any) -> LossParts:
        """Evaluate ``L_merge`` for a loaded model (put in eval mode; no gradients)."""
        was_training = model.training
        model.eval()
        try:
            ls = self.part_loss(model, "safety")
            le = self.part_loss(model, "expert")
        finally:
            model.train(was_training)
        if ls is None:
            loss = float(le)  # type: ignore[arg-type]
        elif le is None:
            loss = float(ls)
        else:
            loss = ls + self.alpha * le
        return LossParts(loss, ls, le)
