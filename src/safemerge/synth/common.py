"""Shared helpers of the synthetic-data pipeline: JSON extraction, deduplication, JSONL I/O,
and access to generators and judges of :mod:`safemerge.evaluate`.

The JSON parsing and deduplication rules implement Hammoud et al. 2024 (arXiv 2406.14563),
App. A.2: "outputs that fail to parse are dropped and duplicates are removed".
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from safemerge.errors import SafemergeError, option
from safemerge.evaluate.generate import load_generator as load_harness_generator
from safemerge.evaluate.judges import get_judge
from safemerge.io.text import read_json_records, read_utf8
from safemerge.options import RunOptions

QUESTION_KEYS = ("Question", "question", "prompt", "instruction", "Prompt", "Instruction", "input", "query")


class GeneratorLike(Protocol):
    """What the pipeline needs from :func:`safemerge.evaluate.generate.load_generator`."""

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: Sequence[str] | None = None, progress: bool = True) -> list[str]: ...


class JudgeLike(Protocol):
    """What the pipeline needs from :func:`safemerge.evaluate.judges.get_judge`."""

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Any]: ...


# ---------------------------------------------------------------------------------- JSON
def _balanced_spans(text: str) -> Iterable[str]:
    """Substrings of ``text`` that start at ``{`` or ``[`` and end at the matching bracket.

    String literals are respected so braces inside quoted text do not break the scan.
    """
    for start, ch in enumerate(text):
        if ch not in "{[":
            continue
        depth, in_str, esc = 0, False, False
        for end in range(start, len(text)):
            c = text[end]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
                continue
            if c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    yield text[start:end + 1]
                    break


def extract_questions(text: str) -> list[str]:
    """Questions found in a generator's JSON output, ``[]`` when nothing parses.

    Accepts a JSON object with a ``Question`` key, a list of such objects, or a list of strings,
    possibly wrapped in prose or a Markdown code fence; the first span that parses as JSON and
    yields questions wins. Only the ``Question`` field is used (Hammoud et al. 2024, App. A.1).
    """
    for span in _balanced_spans(text or ""):
        try:
            obj = json.loads(span)
        except ValueError:
            continue
        found = _questions_from(obj)
        if found:
            return found
    return []


def _questions_from(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        for key in QUESTION_KEYS:
            val = obj.get(key)
            if isinstance(val, str) and val.strip():
                return [val.strip()]
        return []
    if isinstance(obj, list):
        out: list[str] = []
        for item in obj:
            if isinstance(item, str) and item.strip():
                out.append(item.strip())
            elif isinstance(item, (dict, list)):
                out.extend(_questions_from(item))
        return out
    return []


# ---------------------------------------------------------------------------------- dedupe
_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Key used for deduplication: NFKC, lower case, punctuation removed, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = _PUNCT.sub(" ", t)
    return " ".join(t.split())


def dedupe(items: Iterable[Any], key=lambda x: x) -> list[Any]:
    """Keep the first item of each normalised key, preserving order; empty keys are dropped."""
    seen: set[str] = set()
    out = []
    for it in items:
        k = normalize_text(key(it))
        if not k or k in seen:
            continue
        seen.add(k)
        out.append(it)
    return out


# ---------------------------------------------------------------------------------- JSONL
def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]], *, force: bool = False) -> Path:
    """Write records as JSONL through a temporary sibling file renamed into place."""
    p = Path(path).expanduser()
    if p.exists() and not force:
        raise SafemergeError(f"output {str(path)!r} already exists",
                             f"pass {option('force')} to replace it, or choose another path")
    if p.exists() and p.is_dir():
        raise SafemergeError(f"output {str(path)!r} is a directory", "give a file name ending in .jsonl")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL or JSON file (:func:`safemerge.io.text.read_json_records`) or a text file (one question per line).

    Text lines become ``{"prompt": line}``; JSON strings become ``{"prompt": s}``; other JSON values are skipped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SafemergeError(f"data file {str(path)!r} does not exist", "check the path")
    if p.suffix.lower() in (".json", ".jsonl"):
        rows = [rec for rec, _ in read_json_records(p, "data file")]
    else:
        rows = [line.strip() for line in read_utf8(p, "data file").splitlines() if line.strip()]
    return [{"prompt": r} if isinstance(r, str) else r for r in rows if isinstance(r, (str, dict))]


def record_question(rec: dict[str, Any]) -> str | None:
    """The question/prompt text of a record (``prompt``, ``question``, ``instruction`` … keys)."""
    for key in QUESTION_KEYS:
        val = rec.get(key)
        if isinstance(val, str) and val.strip():
            return val.strip()
    return None


def load_questions(spec: str) -> list[dict[str, Any]]:
    """Questions (``{"prompt", "category"}``) from a file, or from a named set of the evaluation harness."""
    if Path(spec).expanduser().is_file():
        out = []
        for rec in read_records(spec):
            q = record_question(rec)
            if q:
                out.append({"prompt": q, "category": rec.get("category")})
        return out
    try:
        from safemerge.evaluate.datasets import load_prompts
    except ImportError:
        raise SafemergeError(f"prompt set {spec!r} is not a file", "give a JSON/JSONL/text file of questions") from None
    return [{"prompt": r.prompt, "category": getattr(r, "category", None)} for r in load_prompts(spec)]


# ---------------------------------------------------------------------------------- models
def load_generator(model: str, *, backend: str = "auto", dtype: str | None = None,
                   options: RunOptions | None = None) -> GeneratorLike:
    """A greedy chat generator for ``model`` (a path) from the evaluation harness (its default dtype:
    bf16 where the CPU has it natively); ``options``: ``allow_pickle``, ``trust_remote_code``."""

    return load_harness_generator(model, backend=backend, dtype=dtype, options=options)


def load_judge(spec: str) -> JudgeLike:
    """A judge from the evaluation harness (``keyword`` or ``llamaguard:PATH``)."""

    return get_judge(spec)


def model_label(path: str) -> str:
    """A short name for a model path (its directory name)."""
    p = Path(str(path).rstrip("/"))
    return p.name or str(path)
