"""D_expert: self-questioning by the domain experts (Hammoud et al. 2024, §4.3, App. A.1, Fig. 4).

Each expert writes exam-style questions for a topic after three in-context examples drawn at
random from a seed file (the paper draws them from the domain benchmark's validation split),
then answers its own questions greedily under its chat template. Duplicates are removed and
questions that copy an in-context example (exact match after normalisation) are dropped.
With ``K`` questions requested and ``N−1`` experts, each expert writes ``⌈K/(N−1)⌉``.

Each record is ``{"prompt", "response", "type": "domain", "category": topic, "source_model"}``.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.options import RunOptions, or_default
from safemerge.synth.common import GeneratorLike, extract_questions, normalize_text
from safemerge.synth.prompts import domain_messages

N_EXAMPLES = 3


@dataclass
class DomainStats:
    """Counts reported by the domain pipeline."""

    requests: int = 0
    parse_failures: int = 0
    duplicates: int = 0
    copies_of_examples: int = 0
    records: int = 0
    by_model: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expert_requests(experts: Mapping[str, GeneratorLike], seeds: Sequence[Any], n: int,
                    seed: int) -> Iterator[tuple[str, GeneratorLike, list[list[Any]]]]:
    """``(name, expert, in-context examples of each request)``: ``⌈n / len(experts)⌉`` requests per expert,
    each with :data:`N_EXAMPLES` seeds drawn without replacement from one seeded stream per expert (pool order)."""
    per_expert = -(-n // len(experts))
    for e_idx, (name, gen) in enumerate(experts.items()):
        rng = random.Random(f"{seed}:{e_idx}")
        yield name, gen, [rng.sample(seeds, N_EXAMPLES) for _ in range(per_expert)]


def is_new_question(question: str, examples: Sequence[str], seen: set[str], stats: DomainStats) -> bool:
    """Keep ``question`` unless it copies a shown example or repeats an earlier one (counted in ``stats``)."""
    key = normalize_text(question)
    if key in {normalize_text(e) for e in examples}:
        stats.copies_of_examples += 1
        return False
    if not key or key in seen:
        stats.duplicates += 1
        return False
    seen.add(key)
    return True


def build_domain_set(
    experts: Mapping[str, GeneratorLike],
    seed_questions: Sequence[str],
    topic: str,
    n: int,
    *,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    stats: DomainStats | None = None,
    options: RunOptions | None = None,
) -> list[dict[str, Any]]:
    """Generate about ``n`` (question, answer) pairs, ``⌈n / len(experts)⌉`` per expert.

    For each request, 3 seed questions are sampled without replacement by a RNG seeded with
    ``options.seed`` (one stream per expert, in pool order). A generated question is dropped when it fails
    to parse, repeats an earlier question (of any expert) or equals one of the in-context examples
    shown to produce it. Every expert then answers its own kept questions. ``options.progress``: generation bars.
    """
    options = or_default(options)
    stats = stats if stats is not None else DomainStats()
    seeds = [s for s in (str(q).strip() for q in seed_questions) if s]
    if len(seeds) < N_EXAMPLES:
        raise SafemergeError(
            f"the seed file has {len(seeds)} questions; {N_EXAMPLES} are needed as in-context examples",
            "give a seed file with at least 3 questions",
        )
    if not experts:
        raise SafemergeError("no expert model given", "pass at least one --model")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for name, gen, shown in expert_requests(experts, seeds, n, options.seed):
        texts = gen.generate([domain_messages(topic, ex) for ex in shown], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=options.progress)
        stats.requests += len(texts)
        kept: list[str] = []
        for ex, text in zip(shown, texts):
            qs = extract_questions(text)
            if not qs:
                stats.parse_failures += 1
                continue
            if is_new_question(qs[0], ex, seen, stats):
                kept.append(qs[0])
        if not kept:
            continue
        answers = gen.generate(kept, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=options.progress)
        for q, a in zip(kept, answers):
            records.append({"prompt": q, "response": str(a).strip(), "type": "domain", "category": topic,
                            "source_model": name})
        stats.by_model[name] = len(kept)
    records = records[:n] if len(records) > n else records
    stats.records = len(records)
    return records
