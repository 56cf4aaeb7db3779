"""``trace.jsonl``: one JSON line per candidate evaluation, appended and flushed as the run goes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Trace:
    """Append-only evaluation log that can be cut back to the last checkpoint on resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pending: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate(self, n_evals: int) -> None:
        """Keep only evaluations with index < ``n_evals`` (lines after the last checkpoint are dropped)."""
        rows = [r for r in self.read() if int(r.get("eval", 0)) < n_evals]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(self.path)

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)

    def flush(self) -> None:
        if not self._pending:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            for r in self._pending:
                fh.write(json.dumps(r) + "\n")
        self._pending.clear()
