"""D_expert by *structured* self-questioning: a few-shot exam format small experts can follow.

The paper's recipe (Hammoud et al. 2024, §4.3, App. A.1) asks each expert for a JSON exam question;
a 135M expert writes nothing parsable that way (issue 15: 0 questions). Here the expert continues a
plain few-shot text of exam problems with their answers::

    Question: <seed question 1>
    Answer: <seed answer 1>

    Question: <seed question 2>
    Answer: <seed answer 2>

    Question: <seed question 3>
    Answer: <seed answer 3>

    Question:

and what it writes up to the next blank line must parse as ``<question>\\nAnswer: <number>``. The
answer line may be a number or an arithmetic expression (``12 * 4 - 3`` or ``12 * 4 - 3 = 45``),
recomputed by :func:`safe_arithmetic` (an AST walk over numbers and ``+ - * / // % **``, never
``eval``); a stated result that contradicts its own expression drops the question. Then the
**answer check**: the expert answers the kept question again, a second, independent decode under
its chat template (the answer that goes into D_expert, as in the paper), and the question is kept
only if that answer's final number equals the number of the first decode. Every drop is counted
(:class:`StructuredStats`).

Each record is ``{"prompt", "response", "type": "domain", "category", "source_model", "answer"}``.
"""
from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.evaluate.metrics import extract_number, normalize_number
from safemerge.options import RunOptions, or_default
from safemerge.synth.common import GeneratorLike, record_question
from safemerge.synth.domain import N_EXAMPLES, DomainStats, expert_requests, is_new_question

#: continuations end at the first blank line (the end of one problem in the few-shot format)
STOP = ["\n\n", "\nQuestion:"]
MIN_QUESTION_WORDS = 5
MAX_OPERAND = 10**9

_ANSWER_LINE = re.compile(r"^\s*(?P<q>\S[^\n]*?)[ \t]*\n\s*Answer[ \t]*:[ \t]*(?P<a>[^\n]*\S)[ \t]*(?:\n|$)")
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


@dataclass(frozen=True)
class SeedProblem:
    """One in-context example: a domain problem and its final (numeric) answer."""

    question: str
    answer: str


@dataclass
class StructuredStats(DomainStats):
    """How many generated problems survive each filter (reported by ``synth domain --structured``):
    the free-form pipeline's counts plus the two answer checks."""

    arithmetic_errors: int = 0
    answer_mismatches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kept_share": round(self.records / self.requests, 4) if self.requests else None}


def safe_arithmetic(expr: str) -> float | None:
    """The value of an arithmetic expression of numbers and ``+ - * / // % **`` and parentheses, else ``None``.

    Parsed with :mod:`ast` and evaluated node by node (no names, calls or attributes; operands and
    exponents bounded), so untrusted model text is never executed.
    """
    text = expr.replace("×", "*").replace("÷", "/").replace("$", "").replace(",", "").strip()
    if not text or len(text) > 200:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            if abs(node.value) > MAX_OPERAND:
                raise ValueError("operand too large")
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = walk(node.operand)
            return v if isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 8:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        return walk(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def answer_number(answer: str) -> tuple[str | None, bool]:
    """``(normalised number, consistent)`` of an answer line: ``45``, ``12 * 4 - 3`` or ``12 * 4 - 3 = 45``.

    ``consistent`` is ``False`` when a stated result contradicts its expression; the number is
    ``None`` when the line is neither a number nor an arithmetic expression.
    """

    text = answer.strip().rstrip(".")
    parts = [p.strip() for p in text.split("=")]
    if len(parts) > 2 or not all(parts):
        return None, True
    if len(parts) == 1:
        direct = normalize_number(parts[0])
        if direct is not None:
            return direct, True
        value = safe_arithmetic(parts[0])
        return (normalize_number(repr(value)) if value is not None else None), True
    value, stated = safe_arithmetic(parts[0]), normalize_number(parts[1])
    if value is None or stated is None:
        return None, True
    return stated, abs(value - float(stated)) <= 1e-9 * max(1.0, abs(value))


def parse_problem(continuation: str) -> tuple[str, str, bool] | None:
    """``(question, answer number, consistent)`` from a continuation of the few-shot text, or ``None``."""
    m = _ANSWER_LINE.match(continuation)
    if m is None:
        return None
    question = " ".join(m.group("q").split())
    if len(question.split()) < MIN_QUESTION_WORDS:
        return None
    number, consistent = answer_number(m.group("a"))
    if number is None:
        return None
    return question, number, consistent


def fewshot_text(examples: Sequence[SeedProblem]) -> str:
    """The few-shot exam text an expert continues (ends with ``Question:``)."""
    blocks = [f"Question: {e.question.strip()}\nAnswer: {e.answer.strip()}" for e in examples]
    return "\n\n".join(blocks) + "\n\nQuestion:"


def _continue(gen: GeneratorLike, texts: list[str], *, max_new_tokens: int, batch_size: int | None,
              progress: bool) -> list[str]:
    """Raw continuations (no chat template) where the backend offers them, else chat generations."""
    complete = getattr(gen, "complete", None)
    if callable(complete):
        return complete(texts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=STOP, progress=progress)
    return gen.generate(texts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=STOP, progress=progress)


def build_structured_domain_set(
    experts: Mapping[str, GeneratorLike],
    seed_problems: Sequence[SeedProblem],
    topic: str,
    n: int,
    *,
    max_new_tokens: int = 96,
    answer_tokens: int = 256,
    answer_instruction: str = "",
    batch_size: int | None = None,
    stats: StructuredStats | None = None,
    options: RunOptions | None = None,
) -> list[dict[str, Any]]:
    """About ``n`` answer-checked (question, answer) pairs, ``⌈n / len(experts)⌉`` requests per expert.

    Per request, 3 seed problems are drawn without replacement (one seeded stream per expert, in
    pool order), the expert continues :func:`fewshot_text`, and the continuation is parsed
    (:func:`parse_problem`). Dropped: unparsable, inconsistent arithmetic, copies of a shown
    example, repeats of an earlier question (any expert), and questions whose second decode — the
    expert's chat answer to ``question + answer_instruction`` — ends in another number. ``options``: ``seed`` of
    the draws, ``progress`` bars of the generations.
    """

    options = or_default(options)
    stats = stats if stats is not None else StructuredStats()
    seeds = [s for s in seed_problems if s.question.strip() and s.answer.strip()]
    if len(seeds) < N_EXAMPLES:
        raise SafemergeError(f"the seed file has {len(seeds)} problems with answers; {N_EXAMPLES} are needed",
                             "give a seed file of records with a question and an 'answer' field")
    if not experts:
        raise SafemergeError("no expert model given", "pass at least one --model")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for name, gen, shown in expert_requests(experts, seeds, n, options.seed):
        texts = _continue(gen, [fewshot_text(ex) for ex in shown], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=options.progress)
        stats.requests += len(texts)
        kept: list[tuple[str, str]] = []
        for ex, text in zip(shown, texts):
            parsed = parse_problem(text)
            if parsed is None:
                stats.parse_failures += 1
                continue
            question, number, consistent = parsed
            if not consistent:
                stats.arithmetic_errors += 1
            elif is_new_question(question, [e.question for e in ex], seen, stats):
                kept.append((question, number))
        prompts = [f"{q} {answer_instruction}".strip() for q, _ in kept]
        answers = (gen.generate(prompts, max_new_tokens=answer_tokens, batch_size=batch_size,
                                progress=options.progress) if kept else [])
        n_kept = 0
        for prompt, (_, number), answer in zip(prompts, kept, answers):
            if extract_number(str(answer)) != number:
                stats.answer_mismatches += 1
                continue
            records.append({"prompt": prompt, "response": str(answer).strip(), "type": "domain", "category": topic,
                            "source_model": name, "answer": number})
            n_kept += 1
        stats.by_model[name] = n_kept
    records = records[:n]
    stats.records = len(records)
    return records


def seed_problems_from_records(records: Sequence[Mapping[str, Any]]) -> list[SeedProblem]:
    """Seed problems from records with a question (``question``/``prompt``/…) and an ``answer``.

    GSM8K-style answers keep only their final number (after ``####``).
    """

    out: list[SeedProblem] = []
    for rec in records:
        q = rec.get("question") if isinstance(rec.get("question"), str) else record_question(dict(rec))
        a = rec.get("answer")
        if not q or a is None:
            continue
        number = extract_number(str(a))
        if number is not None:
            out.append(SeedProblem(str(q).strip(), number))
    return out
