"""Prompt sets for evaluation: files, HEx-PHI folders, built-in smoke sets and hub datasets.

:func:`load_prompts` turns any supported source into a list of :class:`PromptRecord`:

* a file — ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` or ``.parquet``; a *named format* (AdvBench,
  HarmBench, DirectHarm4, BeaverTails, StrongREJECT, JailbreakBench, XSTest, Bianchi et al.,
  GSM8K, PubMedQA PQA-L, multiple choice) is recognised from its columns, or forced with
  ``fmt=``; anything else is read as a generic table with column mapping;
* a directory of ``category_N.csv`` files (HEx-PHI, Qi et al. 2024);
* ``builtin:harmful`` / ``builtin:benign`` / ``builtin:arithmetic`` (:mod:`safemerge.data`);
* a hub dataset id ``owner/name`` (through the ``datasets`` library; a clear error offline).

The per-format loaders live in :mod:`safemerge.evaluate.formats`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from safemerge.data import BUILTIN_SETS, builtin_rows
from safemerge.errors import SafemergeError
from safemerge.evaluate import formats
from safemerge.evaluate.records import PromptRecord
from safemerge.io.checkpoint import require_regular_file

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_table(path: Path) -> Any:
    """Read a data file: a list of row dicts (JSONL, CSV, TSV, parquet, JSON list) or a JSON object.

    Raises:
        SafemergeError: unreadable file, bad JSON/CSV, or an unsupported extension.
    """

    suffix = path.suffix.lower()
    require_regular_file(path, "data file")  # never open a named pipe or device (it would block)
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise SafemergeError(
                                f"{path}:{lineno} is not valid JSON ({exc.msg})",
                                "each line of a .jsonl file must be one JSON object",
                            ) from exc
            return rows
        if suffix == ".json":
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise SafemergeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                                     "fix the file or convert it to JSONL") from exc
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8-sig", newline="") as fh:
                return [dict(r) for r in csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")]
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
    except OSError as exc:
        raise SafemergeError(f"cannot read {path} ({exc.strerror or exc})", "check the path and permissions") from exc
    except UnicodeDecodeError as exc:
        raise SafemergeError(f"{path} is not UTF-8 text (byte offset {exc.start})", "save the file as UTF-8") from None
    except ImportError as exc:
        raise SafemergeError(f"reading {path.name} needs pandas + pyarrow",
                             "pip install 'safemerge[datasets]'") from exc
    raise SafemergeError(
        f"unsupported prompt-set file type {suffix or '(none)'!r}: {path}",
        f"use one of {', '.join(TABLE_SUFFIXES)} or a HEx-PHI folder of category_N.csv files",
    )


def _load_builtin(name: str) -> list[PromptRecord]:
    try:
        rows = builtin_rows(name)
    except KeyError:
        raise SafemergeError(f"unknown built-in prompt set {name!r}",
                             f"use one of: {', '.join('builtin:' + s for s in BUILTIN_SETS)}") from None
    out = []
    for r in rows:
        meta = {k: v for k, v in r.items() if k not in ("id", "prompt", "category", "answer", "label")}
        out.append(PromptRecord(prompt=r["prompt"], id=r["id"], category=r.get("category"),
                                answer=r.get("answer"), label=r.get("label"), meta=meta))
    return out


def _load_hub(spec: str, split: str | None) -> list[dict[str, Any]]:
    """Rows of a hub dataset via ``datasets.load_dataset`` (raises a clear error when offline)."""
    try:
        import datasets
    except ImportError as exc:
        raise SafemergeError(f"{spec!r} is not a local file, and loading hub datasets needs `datasets`",
                             "pip install 'safemerge[datasets]' or pass a local file") from exc
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise SafemergeError(
            f"cannot load hub dataset {spec!r}: {' '.join(str(exc).split())[:160]}",
            "you may be offline (HF_HUB_OFFLINE=1) or the id/split is wrong; download the data and pass a local file",
        ) from exc
    return [dict(r) for r in ds]


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split(":")[0].split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in spec


def load_prompts(
    spec: str,
    *,
    fmt: str | None = None,
    column: str | None = None,
    answer_column: str | None = None,
    category_column: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Load a prompt set.

    Args:
        spec: a file path, a HEx-PHI directory, ``builtin:NAME`` or a hub id ``owner/name[:config]``.
        fmt: force a named format (see :data:`safemerge.evaluate.formats.FORMATS`); default: detect.
        column / answer_column / category_column: column mapping for generic tables (selects the
            generic loader when ``fmt`` is not given).
        split: hub split (default ``train``); for XSTest ``safe``/``unsafe``; for PubMedQA ``test``
            (restricts to the ids of a sibling ``*test_ground_truth.json``); for HarmBench a
            functional category (``standard``/``contextual``/``copyright``).
        limit: keep the first ``limit`` records (deterministic).

    Raises:
        SafemergeError: missing file, unknown format, missing columns, or an offline hub id.
    """

    if limit is not None and limit < 0:
        raise SafemergeError(f"--limit must be ≥ 0, got {limit}", "pass a positive number of prompts")
    if spec.startswith("builtin:"):
        records = _load_builtin(spec.split(":", 1)[1])
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            records = formats.load_hexphi_dir(path)
        elif path.is_file() or path.exists():  # read_table refuses pipes and devices without opening them
            raw = read_table(path)
            records = formats.parse(raw, path=path, fmt=fmt, column=column, answer_column=answer_column,
                                    category_column=category_column, split=split)
        elif _looks_like_hub_id(spec) and path.suffix.lower() not in TABLE_SUFFIXES:
            rows = _load_hub(spec, split)
            records = formats.parse(rows, path=Path(spec.replace("/", "__")), fmt=fmt, column=column,
                                    answer_column=answer_column, category_column=category_column, split=None)
        else:
            raise SafemergeError(f"prompt set not found: {spec}",
                                 "pass an existing file/folder, builtin:harmful|benign|arithmetic, or a hub id "
                                 "owner/name")
    if split in ("safe", "unsafe") and any(r.label for r in records):
        records = [r for r in records if r.label == split]
    if not records:
        raise SafemergeError(f"prompt set {spec} has no prompts", "check the file contents, --split and column mapping")
    return records[:limit] if limit is not None else records
