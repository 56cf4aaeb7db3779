"""The evaluation record every prompt source is turned into, and the prompt sets of one measurement (shared by the
loaders, the harness and the workflows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUITES = ("harmful", "benign", "utility")


@dataclass
class PromptRecord:
    """One evaluation prompt.

    Attributes:
        prompt: the user request (one user turn; ``meta["messages"]`` holds a full chat if given).
        id: stable identifier (from the source, or ``<stem>-<index>``).
        category: harm category / prompt type, used for per-category breakdowns.
        answer: the reference answer of a utility item (final number, ``yes``/``no``/``maybe``,
            an option letter), else ``None``.
        label: ``"safe"``/``"unsafe"`` where the source labels prompts (XSTest), else ``None``.
        meta: everything else (``metric``, ``reference`` text, source columns, ...).
    """

    prompt: str
    id: str
    category: str | None = None
    answer: str | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat to send: ``meta["messages"]`` if present, else one user turn."""
        msgs = self.meta.get("messages")
        if msgs:
            return [dict(m) for m in msgs]
        return [{"role": "user", "content": self.prompt}]


def clean_cell(value: Any) -> str | None:
    """A cell as a stripped string; empty/NaN/None become ``None``."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas
        return None
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class PromptSets:
    """The prompt sets of one measurement (validation or test): each a prompt-set spec, a record list or ``None``."""

    harmful: Any = None
    benign: Any = None
    utility: Any = None

    def filled(self, defaults: PromptSets) -> PromptSets:
        """These sets, with ``defaults``' set for each suite not given here."""
        return PromptSets(*(getattr(self, n) if getattr(self, n) is not None else getattr(defaults, n)
                            for n in SUITES))

    def as_suites(self) -> dict[str, Any]:
        """``{suite: spec}`` of the sets given (the form :func:`safemerge.evaluate.suites.evaluate_suites` takes)."""
        return {name: getattr(self, name) for name in SUITES if getattr(self, name) is not None}
