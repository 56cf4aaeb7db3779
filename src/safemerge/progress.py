"""Progress bars on stderr (rich), with a no-op variant for quiet runs and tests.

On a terminal the bars redraw in place. When stderr is a file or a pipe (``make demo > log``, CI) rich draws
nothing until the work ends, so a 30-minute training step would leave the log silent: there the same bars are
printed as plain lines at most every :data:`LOG_INTERVAL_S` seconds, and once more at the end."""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.utils as hub_utils
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

#: seconds between two progress lines when stderr is not a terminal (the bars are not redrawn there)
LOG_INTERVAL_S = 60.0

StageCallback = Callable[[str, int, int], None]
"""A ``(stage, done, total)`` progress report: what the safety API and LoRA extraction call as they work (the
CLI draws it, :func:`safemerge.cli.safety_cmd.progress_callback`); not the bar switch ``RunOptions.progress``."""


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KB'`` (decimal units, as on disk)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Bar:
    """Handle returned by :func:`progress_bar`; thread-safe ``advance``, ``update`` and ``stage``."""

    def __init__(self, progress: Any = None, task: Any = None, total_bytes: int | None = None,
                 fields: tuple[str, ...] = ()) -> None:
        self._p = progress
        self._t = task
        self._lock = threading.Lock()
        self._done_bytes = 0
        self._total_bytes = total_bytes
        self._fields = fields
        self._stages: dict[str, Any] = {}
        # not a terminal: rich shows nothing until the end, so log the bars' state now and then
        console = progress.console if progress is not None else None
        self._logs = console is not None and not (console.is_terminal or console.is_jupyter)
        self._last_log = time.monotonic()

    def _log_if_due(self) -> None:
        """Print the bars as plain lines when :data:`LOG_INTERVAL_S` has passed since the last (non-terminal
        stderr only; called with the lock held)."""
        if not self._logs:
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            self._p.console.print(self._p.get_renderable())

    def advance(self, job: Any = None, n: int = 1, **fields: Any) -> None:
        if self._p is None:
            return
        with self._lock:
            if self._total_bytes and job is not None and hasattr(job, "shape"):
                self._done_bytes += math.prod(job.shape) * _SIZES.get(getattr(job, "out_dtype", "float32"), 4)
                fields["size"] = f"{human_bytes(self._done_bytes)}/{human_bytes(self._total_bytes)}"
            self._p.update(self._t, advance=n, **fields)
            self._log_if_due()

    def update(self, **fields: Any) -> None:
        if self._p is not None:
            with self._lock:
                self._p.update(self._t, **fields)
                self._log_if_due()

    def stage(self, stage: str, done: int, total: int) -> None:
        """A ``(stage, done, total)`` callback (the safety API's ``progress``): one line per stage, added when
        the stage first reports."""
        if self._p is None:
            return
        with self._lock:
            if stage not in self._stages:
                self._stages[stage] = self._p.add_task(stage, total=total, size="", **dict.fromkeys(self._fields, "—"))
            self._p.update(self._stages[stage], completed=done, total=total)
            self._log_if_due()


@contextmanager
def progress_bar(description: str, *, total: int | None, total_bytes: int | None = None, enabled: bool = True,
                 unit: str = "tensors", fields: tuple[str, ...] = (), transient: bool = False) -> Iterator[Bar]:
    """The one rich progress bar builder (count, bytes, elapsed, ETA) on stderr; ``enabled=False`` → silent.

    ``fields`` name extra status columns shown as ``name value`` (``—`` until ``Bar.advance(name=...)``
    sets them), e.g. ``("loss",)`` for a training loop. ``total=None`` starts with no line of its own: the
    lines come from :meth:`Bar.stage` (one per stage of a multi-stage job). ``transient`` clears the bars
    when the work ends (a failed run always clears them: its error line is what remains)."""
    if not enabled:
        yield Bar()
        return

    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[size]}"),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=transient) as p:
        size = f"0 B/{human_bytes(total_bytes)}" if total_bytes else ""
        t = None if total is None else p.add_task(description, total=total, size=size, **dict.fromkeys(fields, "—"))
        try:
            yield Bar(p, t, total_bytes, fields)
        except BaseException:
            p.live.transient = True  # a failed command prints its error line, not a half-done bar
            raise


def library_progress(enabled: bool, *, loads_models: bool = True) -> None:
    """Progress output of the libraries underneath, set once per command.

    transformers' per-load "Loading weights" bars are always off (safemerge shows its own
    progress; they would interleave with it); Hugging Face Hub download bars follow ``enabled``
    (``--no-progress``/``-q`` silence them). ``loads_models=False`` skips importing transformers.
    """

    if loads_models:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # also disables Hub bars; re-enabled below when wanted
    if enabled and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE"):
        return  # the user switched Hub bars off in the environment: respect it (and avoid the Hub's warning)
    (hub_utils.enable_progress_bars if enabled else hub_utils.disable_progress_bars)()


def path_size(path: str | Path) -> int:
    """Bytes of a file, or of all files under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def summary_line(written: str | Path | Sequence[str | Path], started: float, *, detail: str = "") -> str:
    """The one line every command ends with: ``wrote OUT (1.2 MB) in 3.4 s`` (+ ``; detail``)."""
    paths = [written] if isinstance(written, (str, Path)) else list(written)
    size = sum(path_size(p) for p in paths)
    what = ", ".join(str(p) for p in paths)
    line = f"wrote {what} ({human_bytes(size)}) in {time.perf_counter() - started:.1f} s"
    return f"{line}; {detail}" if detail else line
