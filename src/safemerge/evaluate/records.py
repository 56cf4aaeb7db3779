"""The evaluation record every prompt source is turned into (shared by the loaders and the harness)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
