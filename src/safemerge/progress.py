"""Progress bars on stderr (rich), with a no-op variant for quiet runs and tests."""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KB'`` (decimal units, as on disk)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Bar:
    """Handle returned by :func:`progress_bar`; thread-safe ``advance``."""

    def __init__(self, progress: Any = None, task: Any = None, total_bytes: int | None = None) -> None:
        self._p = progress
        self._t = task
        self._lock = threading.Lock()
        self._done_bytes = 0
        self._total_bytes = total_bytes

    def advance(self, job: Any = None, n: int = 1, **fields: Any) -> None:
        if self._p is None:
            return
        with self._lock:
            if self._total_bytes and job is not None and hasattr(job, "shape"):
                self._done_bytes += math.prod(job.shape) * _SIZES.get(getattr(job, "out_dtype", "float32"), 4)
                fields["size"] = f"{human_bytes(self._done_bytes)}/{human_bytes(self._total_bytes)}"
            self._p.update(self._t, advance=n, **fields)

    def update(self, **fields: Any) -> None:
        if self._p is not None:
            with self._lock:
                self._p.update(self._t, **fields)


@contextmanager
def progress_bar(description: str, *, total: int, total_bytes: int | None = None, enabled: bool = True, unit: str = "tensors") -> Iterator[Bar]:
    """A rich progress bar (count, bytes, elapsed, ETA) on stderr; ``enabled=False`` → silent."""
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[size]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        size = f"0 B/{human_bytes(total_bytes)}" if total_bytes else ""
        t = p.add_task(description, total=total, size=size)
        yield Bar(p, t, total_bytes)
