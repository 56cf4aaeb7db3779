"""Supervised fine-tuning records: read JSONL / JSON / Python lists into ``(prompt, response)`` pairs.

Accepted record shapes (one per line in JSONL, or a JSON list):

- ``{"prompt": ..., "response": ...}`` (optionally ``"system"``) — safemerge's own format;
- ``{"instruction": ..., "input": ..., "output": ...}`` — Alpaca / Bianchi et al. 2024 safety
  data; a non-empty ``input`` is appended to the instruction after a blank line;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` — one user turn
  followed by one assistant turn (a leading system turn is kept);
- ``{"question": ..., "answer": ...}`` — GSM8K-style.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError

_FORMATS_HINT = "each record needs prompt/response, instruction/output (+input), question/answer or messages"


@dataclass(frozen=True)
class SFTRecord:
    """One supervised example: the user turn, the assistant turn to learn, an optional system turn."""

    prompt: str
    response: str
    system: str | None = None


def _from_messages(msgs: Any, where: str) -> SFTRecord:
    if not isinstance(msgs, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs):
        raise SafemergeError(f"{where}: 'messages' must be a list of {{role, content}} objects", _FORMATS_HINT)
    system = None
    turns = list(msgs)
    if turns and turns[0]["role"] == "system":
        system = str(turns[0]["content"])
        turns = turns[1:]
    roles = [m["role"] for m in turns]
    if roles != ["user", "assistant"]:
        raise SafemergeError(
            f"{where}: expected one user turn then one assistant turn, got roles {roles}",
            "split multi-turn conversations into single-turn records",
        )
    return SFTRecord(str(turns[0]["content"]), str(turns[1]["content"]), system)


def to_record(obj: Any, where: str) -> SFTRecord:
    """Normalise one raw record (any accepted shape) into an :class:`SFTRecord`."""
    if isinstance(obj, SFTRecord):
        return obj
    if not isinstance(obj, Mapping):
        raise SafemergeError(f"{where}: expected a JSON object, got {type(obj).__name__}", _FORMATS_HINT)
    system = obj.get("system")
    system = str(system) if system not in (None, "") else None
    if "messages" in obj:
        return _from_messages(obj["messages"], where)
    pairs = (("prompt", "response"), ("instruction", "output"), ("question", "answer"))
    for p_key, r_key in pairs:
        if p_key in obj and r_key in obj:
            prompt, response = obj[p_key], obj[r_key]
            if p_key == "instruction" and obj.get("input"):
                prompt = f"{prompt}\n\n{obj['input']}"
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise SafemergeError(f"{where}: {p_key!r} and {r_key!r} must be strings", _FORMATS_HINT)
            if not response.strip():
                raise SafemergeError(f"{where}: empty {r_key!r}", "remove records without a response")
            return SFTRecord(prompt, response, system)
    raise SafemergeError(f"{where}: missing columns (found {sorted(obj)[:8]})", _FORMATS_HINT)


def _read_file(path: Path) -> list[tuple[Any, str]]:
    if not path.exists():
        raise SafemergeError(f"data file {str(path)!r} does not exist", "check the --data path")
    if path.is_dir():
        raise SafemergeError(f"data path {str(path)!r} is a directory", "pass a .jsonl or .json file")
    from safemerge.io.text import read_json_records

    records = read_json_records(path, "data file")
    if not records:
        raise SafemergeError(f"data file {path} is empty", "add one JSON record per line")
    return records


def load_sft_records(data: str | Path | Iterable[Any]) -> list[SFTRecord]:
    """Read supervised records from a JSONL/JSON file or an iterable of dicts.

    Raises :class:`~safemerge.errors.SafemergeError` naming the file and line for a missing or
    empty file, invalid JSON, or a record without usable columns.
    """
    if isinstance(data, (str, Path)):
        raw = _read_file(Path(data).expanduser())
    else:
        raw = [(rec, f"record {i}") for i, rec in enumerate(data)]
    records = [to_record(obj, where) for obj, where in raw]
    if not records:
        raise SafemergeError("the training data is empty", "provide at least one prompt/response record")
    return records
