"""D_safety: unsafe questions answered with refusals by the model pool (Hammoud et al. 2024, §4.2).

Pipeline (arXiv 2406.14563 §4.2, App. A.2, Fig. 5):

1. **Questions.** A generator writes unsafe questions per harm category as JSON
   (:func:`generate_unsafe_questions`); outputs that do not parse are dropped and duplicates
   removed. Alternatively an existing prompt set is used.
2. **Refusals.** Every model ``f ∈ F`` answers every question greedily under its own chat template;
   a judge (keyword or Llama Guard) labels each answer; answers judged safe are the refusal
   candidates; **one of them is picked uniformly at random** (seeded) per question, and questions
   that no model refused are dropped (:func:`select_refusals`). The authors' code leaves this step
   out; this module implements it as the paper describes.

Each record is ``{"prompt", "response", "type": "safety", "category", "source_model"}``.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safemerge.options import RunOptions, or_default
from safemerge.synth.categories import CATEGORIES
from safemerge.synth.common import GeneratorLike, JudgeLike, dedupe, extract_questions, normalize_text
from safemerge.synth.prompts import safety_messages


@dataclass
class SafetyStats:
    """Counts reported by the pipeline (what was generated, parsed, kept and dropped)."""

    requests: int = 0
    parse_failures: int = 0
    parsed: int = 0
    duplicates: int = 0
    questions: int = 0
    answers: int = 0
    safe_answers: int = 0
    dropped_no_refusal: int = 0
    records: int = 0
    refusals_by_model: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def generate_unsafe_questions(
    generator: GeneratorLike,
    n: int,
    *,
    categories: Sequence[str] | None = None,
    per_request: int = 1,
    max_rounds: int = 4,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    stats: SafetyStats | None = None,
    options: RunOptions | None = None,
) -> list[dict[str, str]]:
    """Ask ``generator`` for about ``n`` unsafe questions spread evenly over ``categories``.

    Requests go round-robin over the categories ("Your topic is #k", Hammoud et al. 2024,
    App. A.2). Decoding is greedy, so each request is made distinct by its request number and by
    listing the category's last questions to avoid. Parse failures are dropped; duplicates
    (after :func:`~safemerge.synth.common.normalize_text`) are removed. Up to ``max_rounds``
    rounds of requests are made while fewer than ``n`` unique questions exist. ``options.progress``: generation bars.

    Returns:
        ``[{"prompt": question, "category": name}]`` (at most ``n``), in generation order.
    """
    progress = or_default(options).progress
    cats = list(categories or CATEGORIES)
    stats = stats if stats is not None else SafetyStats()
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    by_cat: dict[str, list[str]] = {c: [] for c in cats}
    request = 0
    for _round in range(max_rounds):
        missing = n - len(out)
        if missing <= 0:
            break
        n_req = -(-missing // per_request)
        batch, meta = [], []
        for j in range(n_req):
            cat = cats[(request + j) % len(cats)]
            k = CATEGORIES.index(cat) + 1 if cat in CATEGORIES else cats.index(cat) + 1
            batch.append(safety_messages(k, cat, cats, n=per_request, request=request + j + 1, avoid=by_cat[cat][-3:]))
            meta.append(cat)
        request += n_req
        texts = generator.generate(batch, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        stats.requests += len(texts)
        for cat, text in zip(meta, texts):
            qs = extract_questions(text)
            if not qs:
                stats.parse_failures += 1
                continue
            stats.parsed += len(qs)
            for q in qs:
                key = normalize_text(q)
                if not key or key in seen:
                    stats.duplicates += 1
                    continue
                seen.add(key)
                by_cat[cat].append(q)
                out.append({"prompt": q, "category": cat})
    out = out[:n]
    stats.questions = len(out)
    return out


def is_safe_answer(verdict: Any, *, require_refusal: bool = False) -> bool:
    """Whether a judge verdict makes an answer a refusal candidate.

    The paper treats every answer Llama Guard labels *safe* as a refusal (§4.2); with
    ``require_refusal`` the judge must also report an explicit refusal (``Verdict.refusal``).
    """
    if bool(getattr(verdict, "harmful", False)):
        return False
    if require_refusal:
        return getattr(verdict, "refusal", None) is True
    return True


def answer_with_pool(
    questions: Sequence[str],
    pool: Mapping[str, GeneratorLike],
    *,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    options: RunOptions | None = None,
) -> dict[str, list[str]]:
    """Every pool model answers every question (greedy, chat template): ``{model: [answer per question]}``;
    ``options.progress``: generation bars."""
    progress = or_default(options).progress
    return {
        name: list(gen.generate(list(questions), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress))
        for name, gen in pool.items()
    }


def select_refusals(
    questions: Sequence[dict[str, Any]],
    answers: Mapping[str, Sequence[str]],
    judge: JudgeLike,
    *,
    require_refusal: bool = False,
    stats: SafetyStats | None = None,
    options: RunOptions | None = None,
) -> list[dict[str, Any]]:
    """Judge every answer and keep one random safe answer per question (Hammoud et al. 2024, §4.2).

    For question ``q`` with safe answers ``S(q) = {f ∈ F : judge(q, f(q)) is safe}``, the record's
    response is ``f(q)`` for ``f`` drawn uniformly from ``S(q)`` with a RNG seeded by ``options.seed``
    (models are considered in pool order, so the draw is reproducible); ``q`` is dropped when
    ``S(q) = ∅``.
    """
    stats = stats if stats is not None else SafetyStats()
    prompts = [q["prompt"] for q in questions]
    safe: dict[str, list[bool]] = {}
    for name, resp in answers.items():
        if len(resp) != len(prompts):
            raise ValueError(f"model {name!r} gave {len(resp)} answers for {len(prompts)} questions")
        verdicts = judge.judge(prompts, list(resp))
        safe[name] = [is_safe_answer(v, require_refusal=require_refusal) for v in verdicts]
        stats.answers += len(resp)
        stats.safe_answers += sum(safe[name])
    rng = random.Random(or_default(options).seed)
    records: list[dict[str, Any]] = []
    for i, q in enumerate(questions):
        cands = [name for name in answers if safe[name][i] and str(answers[name][i]).strip()]
        if not cands:
            stats.dropped_no_refusal += 1
            continue
        pick = cands[rng.randrange(len(cands))]
        stats.refusals_by_model[pick] = stats.refusals_by_model.get(pick, 0) + 1
        records.append({
            "prompt": q["prompt"],
            "response": str(answers[pick][i]).strip(),
            "type": "safety",
            "category": q.get("category"),
            "source_model": pick,
        })
    stats.records = len(records)
    return records


def build_safety_set(
    questions: Sequence[dict[str, Any]],
    pool: Mapping[str, GeneratorLike],
    judge: JudgeLike,
    *,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    require_refusal: bool = False,
    stats: SafetyStats | None = None,
    options: RunOptions | None = None,
) -> list[dict[str, Any]]:
    """Deduplicate ``questions``, let the pool answer, and select refusals (steps 1b–2 of §4.2);
    ``options``: ``seed`` of the refusal draw, ``progress`` bars of the generations."""
    stats = stats if stats is not None else SafetyStats()
    before = len(questions)
    qs = dedupe(list(questions), key=lambda r: r["prompt"])
    stats.duplicates += before - len(qs)
    stats.questions = len(qs)
    answers = answer_with_pool([q["prompt"] for q in qs], pool, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               options=options)
    return select_refusals(qs, answers, judge, require_refusal=require_refusal, stats=stats, options=options)
