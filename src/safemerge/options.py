"""The run-wide options of one safemerge job, built once and passed down (issue 12, item 4).

:class:`RunOptions` holds what every command shares — how inputs may be read (pickles, NaN/Inf,
model code), whether an output may be replaced, the output dtype, the device, the seed, the
worker threads and the progress bars — in the spirit of mergekit's ``MergeOptions``. The command
line builds it once (``cli/options.py::run_options``) and hands it to the library; Python callers
pass ``options=RunOptions(...)`` or nothing (the defaults are the safe ones). Functions keep in
their own signature only what differs between commands.

A leaf module: no torch, no other safemerge module but :mod:`safemerge.errors`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from safemerge.errors import ConfigError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class RunOptions:
    """Options shared by every safemerge job; immutable, so one object can be handed down safely.

    Attributes:
        allow_pickle: accept ``.bin``/``.pt`` pickle checkpoints (read with ``weights_only=True``).
        allow_nonfinite: use inputs holding NaN/Inf instead of refusing them.
        trust_remote_code: allow model code shipped in a model directory. Off unless the user asks
            (``--trust-remote-code``); every Hugging Face load still passes it explicitly.
        force: replace an existing output (still written to a temporary sibling first).
        dtype: storage dtype of written weights, ``float32``, ``float16`` or ``bfloat16`` (``None``: the
            inputs'), checked where weights are written.
        device: ``cpu``, ``cuda`` or ``cuda:N`` for the arithmetic.
        seed: seed of every stochastic step; the same seed gives byte-identical outputs.
        threads: worker threads of the merge engine (``None``: one per CPU); the bits do not depend on it.
        progress: draw progress bars on stderr.
    """

    allow_pickle: bool = False
    allow_nonfinite: bool = False
    trust_remote_code: bool = False
    force: bool = False
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"unknown device {self.device!r}", "use cpu or cuda (cuda:N)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}", "use -j 1 or more")

    def replace(self, **changes: object) -> RunOptions:
        """A copy with ``changes`` (e.g. ``options.replace(allow_nonfinite=True)`` where a caller checks itself)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


DEFAULT = RunOptions()
"""The safe defaults: no pickles, no NaN/Inf, no model code, nothing replaced, seed 0."""


def or_default(options: RunOptions | None) -> RunOptions:
    """``options``, or the safe defaults when a caller passed none."""
    return DEFAULT if options is None else options
