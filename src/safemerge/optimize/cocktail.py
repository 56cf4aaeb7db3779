"""LM-Cocktail: whole-model weights from each model's loss on the data.

Xiao et al. 2023 ("LM-Cocktail: Resilient tuning of language models via model merging"), as used by
Hammoud et al. 2024 (§3.2, Eq. 3; §4.4): each pool model ``f_t`` is scored on the data ``D``
(D_expert, or D_expert ∪ D_safety through the objective ``L = L_safety + α·L_expert``), and

    λ = softmax(−L_t / T),        θ_merged = Σ_t λ_t θ_t

is a weighted average of the **whole** weight vectors (not of task vectors). The temperature
``T`` defaults to 1.0, as in the authors' call (the library's own default is 5).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def cocktail_weights(losses: Sequence[float], temperature: float = 1.0) -> list[float]:
    """``softmax(−loss / T)``, computed stably (max-subtracted)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    z = [-float(l) / temperature for l in losses]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def cocktail_config(models: Sequence[str], weights: Sequence[float], *, dtype: str = "float32",
                    tokenizer_source: str | None = None) -> dict[str, Any]:
    """The mergekit ``linear`` config of the weighted whole-model average (weights already sum to 1)."""
    cfg: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": round(float(w), 10)}} for m, w in zip(models, weights)],
        "parameters": {"normalize": False},
        "dtype": dtype,
    }
    if tokenizer_source:
        cfg["tokenizer_source"] = tokenizer_source
    return cfg


def run_cocktail(models: Sequence[str], backend: Any, temperature: float, trace: Any) -> dict[str, Any]:
    """Score every pool model once, compute the weights and return the merge config and losses."""
    results = backend.score_models(list(models))
    losses = [float(r["loss"]) for r in results]
    weights = cocktail_weights(losses, temperature)
    for i, (m, r, w) in enumerate(zip(models, results, weights)):
        trace.add({"eval": i, "generation": 0, "strategy": "cocktail", "model": m, **r, "cocktail_weight": w})
    trace.flush()
    return {"losses": losses, "weights": weights, "evals": len(models)}
