"""Where safemerge caches what it builds, and how a cached step is named.

Shared by every workflow that caches: the demo zoo (``demo/zoo.py``), ``safemerge repair``
(``repair/pipeline.py``) and automatic τ/α (``cli/tau_alpha.py``). A cached directory is named after
:func:`fingerprint` of everything that determines it, so changing a setting never reuses a stale result.

A leaf module: no torch, no other safemerge module but :mod:`safemerge.errors`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root, created: ``cache_dir``, else ``$SAFEMERGE_CACHE``, else ``~/.cache/safemerge``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("SAFEMERGE_CACHE"):
        root = Path(os.environ["SAFEMERGE_CACHE"])
    else:
        root = Path.home() / ".cache" / "safemerge"
    root = root.expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SafemergeError(f"cannot create the cache directory {root} ({exc.strerror})",
                             "pass --cache-dir DIR or set SAFEMERGE_CACHE to a writable location") from exc
    return root


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (paths, settings, data records).

    The demo zoo's model cache is keyed by it: its output must never change for the same parts.
    """
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]
