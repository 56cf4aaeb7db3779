"""Reading user text files (configs, prompt sets, data) as UTF-8 with a one-line error, and the one reader of
JSON / JSONL record files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


#: keys under which a JSON object file may hold its list of records (``{"data": [...]}`` as HF datasets export)
RECORD_LIST_KEYS = ("data", "rows", "examples", "instances")


def read_json_records(path: str | Path, what: str) -> list[tuple[Any, str]]:
    """The records of a JSONL file (one JSON value per line) or a JSON file (a list, or an object holding the list
    under one of :data:`RECORD_LIST_KEYS`), each with where it came from (``"f.jsonl line 3"``,
    ``"f.json record 2"``) for the caller's messages about its content. A file whose text starts with ``[`` is read
    as one JSON list whatever its suffix.

    Raises:
        SafemergeError: the file cannot be read (:func:`read_utf8`), is not valid JSON (naming the line), or is a
            JSON file that holds no list of records.
    """

    p = Path(path).expanduser()
    text = read_utf8(p, what)
    if p.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SafemergeError(f"cannot parse {what} {str(path)!r} ({exc})",
                                 "fix the JSON, or write JSONL (one object per line)") from None
        if isinstance(data, dict):
            data = next((data[k] for k in RECORD_LIST_KEYS if isinstance(data.get(k), list)), data)
        if not isinstance(data, list):
            raise SafemergeError(f"{what} {str(path)!r} is not a list of records",
                                 "write a JSON list [ ... ] (or under \"data\"), or JSONL (one object per line)")
        return [(rec, f"{p.name} record {i}") for i, rec in enumerate(data, start=1)]
    records: list[tuple[Any, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((json.loads(line), f"{p.name} line {lineno}"))
            except ValueError as exc:
                raise SafemergeError(f"cannot parse {what} {str(path)!r}: line {lineno} is not valid JSON ({exc})",
                                     "write one JSON object per line") from None
    return records
