"""The training objective of ``train-lora``: the mean cross-entropy of the answer tokens, with the output layer
applied to the answer positions only.

SFT masks the prompt (labels ``-100``), so the loss is

    L = − (1/|R|) Σ_{t∈R} log softmax(W_out h_{t−1})[x_t],   R = the positions whose label is not ``-100``,

where ``h`` is the decoder's last hidden state and ``W_out`` the output layer (the LM head). A causal LM's
``forward(labels=…)`` computes the logits of *every* position — batch × length × vocabulary — and then drops the
masked ones. On a small-vocabulary-heavy model that is a large share of a step: SmolLM2-135M's LM head is 28M of
its 135M parameters, and in the demo's safety data the prompt is more than half of each example.
:func:`answer_token_loss` runs the decoder, gathers the hidden states of the predicting positions and applies the
LM head to those alone: the same value (the same logits rows, the same mean over R), a smaller step
(docs/benchmarks.md, "Training step") and no batch × length × vocabulary logits tensor.

Only for architectures whose LM head is exactly ``lm_head(last_hidden_state)`` (:data:`PLAIN_HEAD_MODELS`: no logit
soft-capping or scaling); any other model goes through its own ``forward(labels=…)``.

:func:`unlikelihood_loss` is the other side of the same positions: the token-level unlikelihood of Welleck et al.
(2020, "Neural text generation with unlikelihood training", Eq. 4) on the labelled tokens of *rejected* answers,

    L_UL = − (1/|R|) Σ_{t∈R} log (1 − p(x_t | x_<t)),

which pushes the probability of those tokens down (``safemerge safety-lora`` uses it on the opening words of a
refusal after a benign look-alike: refuse harm, not the look-alike's wording).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from safemerge.train.tokenize import IGNORE_INDEX

#: ``config.model_type`` of causal LMs whose logits are ``lm_head(decoder(x).last_hidden_state)`` and whose loss is
#: the token-mean cross-entropy of the shifted labels (transformers' ``ForCausalLMLoss``).
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def _causal_lm(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_plain_head(model: Any) -> bool:
    """Whether :func:`answer_token_loss` may apply the LM head to the answer positions only (see the module)."""
    return getattr(_causal_lm(model).config, "model_type", None) in PLAIN_HEAD_MODELS


def _answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of the positions that predict a labelled token, and those tokens (in the same order)."""
    targets = batch["labels"][:, 1:]
    predicting = targets != IGNORE_INDEX  # position t−1 predicts token t
    if not has_plain_head(model):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return model(**inputs).logits[:, :-1][predicting].float(), targets[predicting]
    base = _causal_lm(model)
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return base.get_output_embeddings()(hidden[:, :-1][predicting]).float(), targets[predicting]


def answer_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (``input_ids``, ``attention_mask``, ``labels``;
    :func:`~safemerge.train.tokenize.collate`), the LM head applied only where a label is predicted.

    ``model`` is a causal LM or a PEFT model around one; LoRA layers in the decoder or on the head take part as in
    ``forward``. For models outside :data:`PLAIN_HEAD_MODELS`, ``model(**batch).loss``.
    """
    if not has_plain_head(model):
        return model(**batch).loss
    logits, targets = _answer_logits(model, batch)
    return F.cross_entropy(logits, targets)


def unlikelihood_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al. 2020, Eq. 4) of the labelled tokens of ``batch``:
    ``− mean log(1 − p(x_t | x_<t))``, with ``p`` clamped below 1 so the loss stays finite."""
    logits, targets = _answer_logits(model, batch)
    p = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1).exp()
    return -torch.log1p(-p.clamp(max=1.0 - 1e-6)).mean()
