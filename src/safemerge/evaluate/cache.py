"""``generations.jsonl``: an append-only cache of model responses.

Each line is one generation: ``{"key", "suite", "id", "prompt", "response", "model", "settings"}``.
The key is SHA-256 over the model identity (the contents of the files that define a model or adapter up to
256 MiB, else its path + their sizes/mtimes; a weight fingerprint for in-memory models; plus the adapter's), the
chat messages and the generation settings (backend, max_new_tokens, stop strings, greedy) — among them the
request the response was generated in (:func:`request_digest`: the ordered prompts of one evaluation run): in bf16 a
response depends on the batch it shared (padding width, matmul shapes), so a cached response is reused only by the
same request, which forms the same batches, and an evaluation's texts never depend on what an earlier, differently
sized one left in the cache. Lines are appended and flushed after every batch, so an interrupted run resumes where
it stopped, and re-judging reads the responses back without regenerating. A truncated last line (crash mid-write)
is ignored.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def generation_key(identity: str, messages: list[dict[str, str]], settings: dict[str, Any]) -> str:
    """Stable cache key for one generation."""
    blob = json.dumps({"model": identity, "messages": messages, "settings": settings}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def request_digest(prompts: list[list[dict[str, str]]]) -> str:
    """SHA-256 of the ordered chat prompts of one request — part of each of its generations' settings, so responses
    are shared only by requests that batch them alike."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


class GenerationCache:
    """Responses keyed by :func:`generation_key`; backed by a JSONL file when ``path`` is given."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by an interrupted run
                    if isinstance(row, dict) and "key" in row and "response" in row:
                        self.entries[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> str | None:
        row = self.entries.get(key)
        return None if row is None else row["response"]

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Record new generations (each row has at least ``key`` and ``response``) and flush them."""
        for row in rows:
            self.entries[row["key"]] = row
        if self.path is None or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as fh:  # finish a torn last line before appending
            fh.seek(0, 2)
            if fh.tell() > 0:
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        with self.path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
