"""Machine-readable scan output: a JSON list of per-layer records and the same as CSV."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from safemerge.safety.selection import LayerScore

FIELDS = ("source", "module", "layer", "name", "rho", "delta_norm", "v_norm", "merged", "rank")


def records(scores: Iterable[LayerScore]) -> list[dict]:
    """One dict per layer with the keys :data:`FIELDS` (``module`` is the full module path)."""
    return [{k: getattr(s, k) for k in FIELDS} for s in scores]


def write_json_records(path: str | Path, scores: Iterable[LayerScore]) -> None:
    Path(path).write_text(json.dumps(records(scores), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, scores: Iterable[LayerScore]) -> None:
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(FIELDS), lineterminator="\n")
        w.writeheader()
        for r in records(scores):
            w.writerow({k: ("" if v is None else (repr(v) if isinstance(v, float) else v)) for k, v in r.items()})
