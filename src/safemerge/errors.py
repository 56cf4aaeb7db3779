"""User-facing errors.

Every problem caused by the user's input (a path, a config, a checkpoint, a value) is raised
as :class:`SafemergeError`. The CLI prints it as one line (plus an optional one-line hint),
exits with status 2 and never shows a traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Set while the command line runs a command: hints then name flags (``--force``) instead of
# keyword arguments (``force=True``). A plain module flag, not a context variable, so that
# errors raised in worker threads of a CLI run also name the flag.
_FROM_CLI = [False]


@contextlib.contextmanager
def cli_invocation() -> Iterator[None]:
    """Mark errors raised inside the block as coming from the command line (see :func:`option`)."""
    before = _FROM_CLI[0]
    _FROM_CLI[0] = True
    try:
        yield
    finally:
        _FROM_CLI[0] = before


def option(name: str, value: str = "True") -> str:
    """How the user turns on option ``name`` where the error surfaces: ``--allow-pickle`` on the
    command line, ``allow_pickle=True`` when calling the Python API."""
    return f"--{name}" if _FROM_CLI[0] else f"{name.replace('-', '_')}={value}"


class SafemergeError(Exception):
    """A problem with the user's input, reported as ``error: <message>`` + ``hint: <hint>``.

    Args:
        message: one line naming the problem (what, where).
        hint: one line naming the fix, or ``None``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.hint = " ".join(str(hint).split()) if hint else None

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(SafemergeError):
    """Invalid merge/optimise configuration (YAML or parameters)."""


class CheckpointError(SafemergeError):
    """A model or adapter directory that cannot be read, or whose tensors are unusable."""


class GateFailed(SafemergeError):
    """A release gate (e.g. ``--max-harm``) was not met; exit status 3."""

    exit_code = 3
