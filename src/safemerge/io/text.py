"""Reading user text files (configs, prompt sets, data) as UTF-8 with a one-line error."""
from __future__ import annotations

from pathlib import Path

from safemerge.errors import SafemergeError
from safemerge.io.checkpoint import require_regular_file


def read_utf8(path: str | Path, what: str) -> str:
    """The text of ``path``; a file that is not a regular file, cannot be read or is not UTF-8 raises
    :class:`SafemergeError`.

    Args:
        path: the file.
        what: what the file is, for the message (``"optimize config"``, ``"prompt set"`` …).
    """

    p = Path(path).expanduser()
    require_regular_file(p, what)  # a named pipe or device would block the read forever
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SafemergeError(f"cannot read {what} {str(path)!r} ({exc.strerror})",
                             "check the path and its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafemergeError(
            f"{what} {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            "save the file as UTF-8",
        ) from None
