"""Self-distillation: a model's own answers to prompts, kept only when they help.

Mixing a model's own helpful answers to benign look-alikes into safety training keeps it from learning
"refuse anything that sounds dangerous" (Bianchi et al. 2024 mix safety data with general instructions
for the same reason). The demo's safety SFT distils the *base* model's answers; ``safemerge safety-lora``
distils the *aligned* model's, so the safety LoRA is taught to keep helping exactly where the aligned
model helps (a regulariser: it moves nothing there) while it learns the refusals.
"""

from __future__ import annotations

from pathlib import Path

from safemerge.evaluate.generate import load_generator
from safemerge.evaluate.judges import KeywordJudge
from safemerge.options import RunOptions, or_default

DISTILL_MAX_NEW_TOKENS = 96
# bf16 with batch 64 generates ~3x faster than float32/16 on a CPU (issue 13); answers are training targets only.
DISTILL_DTYPE, DISTILL_BATCH = "auto", 64


def is_degenerate(text: str, *, max_repeats: int = 2, min_unique_ratio: float = 0.3) -> bool:
    """A generation stuck in a loop: a non-empty line repeated more than ``max_repeats`` times, or
    fewer than ``min_unique_ratio`` distinct words. Such answers are not worth distilling (a 135M
    model loops on some prompts; training on the loop would teach it)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and max(lines.count(ln) for ln in lines) > max_repeats:
        return True
    words = text.split()
    return len(words) >= 12 and len(set(words)) / len(words) < min_unique_ratio


def self_distill(
    model: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = DISTILL_MAX_NEW_TOKENS,
    dtype: str = DISTILL_DTYPE,
    options: RunOptions | None = None,
) -> list[dict[str, str]]:
    """Answer ``prompts`` with ``model`` itself (greedy) → ``{"prompt", "response"}`` records.

    ``dtype`` is the generation's own compute dtype (``auto``: bf16 where native); ``options``: ``allow_pickle`` and
    ``trust_remote_code`` of the model load, ``progress`` of the generation bar.

    Answers that are empty, loop (:func:`is_degenerate`) or that the keyword judge reads as refusals
    are dropped: a refusal to a harmless request is exactly what safety training must not learn.
    """

    options = or_default(options)
    gen = load_generator(str(model), backend="hf", device="cpu", dtype=dtype, options=options)
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens, batch_size=DISTILL_BATCH,
                        description="self-distilling benign answers", progress=options.progress)
    judge = KeywordJudge()
    rows = []
    for p, r in zip(prompts, outs):
        r = r.strip()
        if r and not is_degenerate(r) and judge.matched(r) is None:
            rows.append({"prompt": p, "response": r})
    return rows
