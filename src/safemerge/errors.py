"""User-facing errors.

Every problem caused by the user's input (a path, a config, a checkpoint, a value) is raised
as :class:`SafemergeError`. The CLI prints it as one line (plus an optional one-line hint),
exits with status 2 and never shows a traceback unless ``--debug`` is given.
"""
from __future__ import annotations


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
