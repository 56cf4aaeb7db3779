"""Named prompt-set formats: recognise a table by its columns and turn rows into PromptRecords.

Formats (column layouts as published; see ``docs/evaluation.md``):

============== ===================================================================
advbench       CSV ``goal,target`` (Zou et al. 2023, GCG)
harmbench      CSV ``Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID``
hexphi         folder of ``category_N.csv``, one bare prompt per line (Qi et al. 2024)
directharm4    parquet/table ``instruction,category`` (Lyu et al. 2024)
beavertails    JSONL ``prompt,category[,response,is_safe]`` (Ji et al. 2023)
strongreject   CSV ``category,source,forbidden_prompt`` (Souly et al. 2024)
jbb            CSV ``Behavior,Goal,Target,Category,Source`` (JailbreakBench, Chao et al. 2024)
xstest         CSV ``id,prompt,type,label,focus,note`` (Röttger et al. 2024)
bianchi        JSON ``{instructions, inputs|tags}`` or ``[{instruction,input,output}]`` (Bianchi et al. 2024)
gsm8k          JSONL ``question,answer`` with ``#### N`` (Cobbe et al. 2021)
pubmedqa       PQA-L JSON ``{pmid: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER}}`` (Jin et al. 2019)
mc             JSONL ``question,choices,answer`` (generic multiple choice)
generic        any table; prompt/answer/category columns mapped or guessed
============== ===================================================================
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.evaluate.records import PromptRecord, clean_cell

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "forbidden_prompt", "behavior", "Behavior", "Goal",
                  "question", "query", "text", "input", "user")
ANSWER_COLUMNS = ("answer", "final_decision", "label_answer", "target_answer")
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory", "type", "tags", "harm_category")
ID_COLUMNS = ("id", "ID", "uid", "BehaviorID", "idx", "index", "Index")

# HEx-PHI category names (Qi et al. 2024, "Fine-tuning Aligned Language Models Compromises Safety").
HEXPHI_CATEGORIES = {
    1: "illegal_activity", 2: "child_abuse_content", 3: "hate_harass_violence", 4: "malware",
    5: "physical_harm", 6: "economic_harm", 7: "fraud_deception", 8: "adult_content",
    9: "political_campaigning", 10: "privacy_violation", 11: "tailored_financial_advice",
}

GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer as a number after '####'."
PUBMEDQA_INSTRUCTION = "Answer the question with yes, no, or maybe."
MC_INSTRUCTION = "Answer with the letter of the correct option."


def _id(row: dict[str, Any], stem: str, i: int) -> str:
    for c in ID_COLUMNS:
        v = clean_cell(row.get(c))
        if v is not None:
            return v
    return f"{stem}-{i:04d}"


def _require(rows: list[dict[str, Any]], cols: tuple[str, ...], fmt: str, path: Path) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in cols if c not in have]
    if missing:
        raise SafemergeError(f"{path.name} is not in {fmt} format: missing column(s) {', '.join(missing)}",
                             f"columns found: {', '.join(sorted(map(str, have))) or 'none'}; drop --format or fix the "
                             "file")


def _rows(raw: Any, fmt: str, path: Path) -> list[dict[str, Any]]:
    if isinstance(raw, list) and all(isinstance(r, dict) for r in raw):
        return raw
    raise SafemergeError(f"{path.name} is not a table of rows as the {fmt} format expects",
                         "use a JSONL/CSV/parquet file with one prompt per row")


# ---------------------------------------------------------------------------- safety sets
def load_advbench(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    rows = _rows(raw, "advbench", path)
    _require(rows, ("goal",), "advbench", path)
    return [PromptRecord(prompt=r["goal"].strip(), id=f"advbench-{i:04d}", category=None,
                         meta={"target": clean_cell(r.get("target"))})
            for i, r in enumerate(rows) if clean_cell(r.get("goal"))]


def load_harmbench(raw: Any, path: Path, split: str | None = None, **_: Any) -> list[PromptRecord]:
    """HarmBench behaviours; contextual ones are shown as ``context\\n\\n---\\n\\nbehavior`` as in HarmBench."""
    rows = _rows(raw, "harmbench", path)
    _require(rows, ("Behavior",), "harmbench", path)
    out = []
    for i, r in enumerate(rows):
        behavior, context = clean_cell(r.get("Behavior")), clean_cell(r.get("ContextString"))
        functional = clean_cell(r.get("FunctionalCategory"))
        if behavior is None or (split and functional and functional != split):
            continue
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        out.append(PromptRecord(prompt=prompt, id=clean_cell(r.get("BehaviorID")) or f"harmbench-{i:04d}",
                                category=clean_cell(r.get("SemanticCategory")),
                                meta={"behavior": behavior, "context": context, "functional_category": functional,
                                      "tags": clean_cell(r.get("Tags"))}))
    return out


def load_hexphi_dir(path: Path) -> list[PromptRecord]:
    """A HEx-PHI folder: ``category_N.csv`` files with one bare prompt per line (no header)."""
    files = sorted(path.glob("category_*.csv"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise SafemergeError(f"{path} is a directory without category_N.csv files",
                             "pass a HEx-PHI folder (category_1.csv …) or a single prompt-set file")
    out: list[PromptRecord] = []
    for f in files:
        out.extend(load_hexphi_file(f))
    return out


def load_hexphi_file(path: Path, **_: Any) -> list[PromptRecord]:
    num = int(re.sub(r"\D", "", path.stem) or 0)
    cat = HEXPHI_CATEGORIES.get(num, f"category_{num}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            lines = [row[0].strip() for row in csv.reader(fh) if row and row[0].strip()]
    except UnicodeDecodeError as exc:
        raise SafemergeError(f"{path} is not UTF-8 text (byte offset {exc.start})", "save the file as UTF-8") from None
    return [PromptRecord(prompt=p, id=f"hexphi-{num}-{i:03d}", category=cat) for i, p in enumerate(lines)]


def load_directharm4(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    rows = _rows(raw, "directharm4", path)
    _require(rows, ("instruction",), "directharm4", path)
    return [PromptRecord(prompt=str(r["instruction"]).strip(), id=f"directharm4-{i:04d}",
                         category=clean_cell(r.get("category")))
            for i, r in enumerate(rows) if clean_cell(r.get("instruction"))]


def load_beavertails(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    """BeaverTails-Evaluation rows, or BeaverTails QA pairs (unsafe prompts only, de-duplicated)."""
    rows = _rows(raw, "beavertails", path)
    _require(rows, ("prompt",), "beavertails", path)
    out, seen = [], set()
    for i, r in enumerate(rows):
        prompt = clean_cell(r.get("prompt"))
        if prompt is None or prompt in seen or r.get("is_safe") is True:
            continue
        seen.add(prompt)
        cat = r.get("category")
        if isinstance(cat, dict):
            cat = ",".join(sorted(k for k, v in cat.items() if v)) or None
        out.append(PromptRecord(prompt=prompt, id=clean_cell(r.get("id")) or f"beavertails-{i:05d}",
                                category=clean_cell(cat)))
    return out


def load_strongreject(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    rows = _rows(raw, "strongreject", path)
    _require(rows, ("forbidden_prompt",), "strongreject", path)
    return [PromptRecord(prompt=str(r["forbidden_prompt"]).strip(), id=f"strongreject-{i:04d}",
                         category=clean_cell(r.get("category")), meta={"source": clean_cell(r.get("source"))})
            for i, r in enumerate(rows) if clean_cell(r.get("forbidden_prompt"))]


def load_jbb(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    rows = _rows(raw, "jbb", path)
    _require(rows, ("Goal",), "jbb", path)
    return [PromptRecord(prompt=str(r["Goal"]).strip(), id=clean_cell(r.get("Behavior")) or f"jbb-{i:03d}",
                         category=clean_cell(r.get("Category")),
                         meta={"target": clean_cell(r.get("Target")), "source": clean_cell(r.get("Source"))})
            for i, r in enumerate(rows) if clean_cell(r.get("Goal"))]


def load_xstest(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    """XSTest: ``label`` = safe/unsafe (v2), or unsafe ⇔ ``type`` starts with ``contrast_`` (v1)."""
    rows = _rows(raw, "xstest", path)
    _require(rows, ("prompt", "type"), "xstest", path)
    out = []
    for i, r in enumerate(rows):
        typ = clean_cell(r.get("type")) or ""
        label = clean_cell(r.get("label")) or ("unsafe" if typ.startswith("contrast_") else "safe")
        out.append(PromptRecord(prompt=str(r["prompt"]).strip(), id=f"xstest-{clean_cell(r.get('id')) or i}",
                                category=typ or None, label=label.lower(),
                                meta={"focus": clean_cell(r.get("focus")), "note": clean_cell(r.get("note"))}))
    return out


def load_bianchi(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    """Bianchi et al. (Safety-Tuned LLaMAs) instruction files: evaluation dicts or training lists."""
    stem = path.stem.replace("bianchi_", "")
    out = []
    if isinstance(raw, dict) and "instructions" in raw:
        instr = raw["instructions"]
        inputs = raw.get("inputs") or []
        tags = raw.get("tags") or []
        for i, ins in enumerate(instr):
            extra = clean_cell(inputs[i]) if i < len(inputs) else None
            prompt = f"{ins.strip()}\n\n{extra}" if extra else ins.strip()
            cat = clean_cell(tags[i]) if i < len(tags) else stem
            out.append(PromptRecord(prompt=prompt, id=f"{stem}-{i:04d}", category=cat))
        return out
    rows = _rows(raw, "bianchi", path)
    _require(rows, ("instruction",), "bianchi", path)
    for i, r in enumerate(rows):
        extra = clean_cell(r.get("input"))
        prompt = f"{r['instruction'].strip()}\n\n{extra}" if extra else r["instruction"].strip()
        out.append(PromptRecord(prompt=prompt, id=f"{stem}-{i:05d}", category=stem,
                                meta={"reference": clean_cell(r.get("output"))}))
    return out


# ---------------------------------------------------------------------------- utility sets
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after ``####`` in a GSM8K solution, commas removed."""
    m = re.search(r"####\s*([-+]?[\d,]*\.?\d+)", solution)
    return m.group(1).replace(",", "") if m else None


def load_gsm8k(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    rows = _rows(raw, "gsm8k", path)
    _require(rows, ("question", "answer"), "gsm8k", path)
    out = []
    for i, r in enumerate(rows):
        sol = str(r["answer"])
        out.append(PromptRecord(prompt=f"{r['question'].strip()}\n{GSM8K_INSTRUCTION}", id=f"gsm8k-{i:04d}",
                                answer=gsm8k_final_answer(sol),
                                meta={"metric": "gsm8k", "question": r["question"], "reference": _CALC.sub("", sol)}))
    return out


def load_pubmedqa(raw: Any, path: Path, split: str | None = None, **_: Any) -> list[PromptRecord]:
    """PubMedQA PQA-L; ``split="test"`` keeps the ids of a sibling ``*test_ground_truth.json``."""

    if not isinstance(raw, dict) or not all(isinstance(v, dict) and "QUESTION" in v for v in raw.values()):
        raise SafemergeError(f"{path.name} is not a PubMedQA PQA-L file",
                             "expected a JSON object {pmid: {QUESTION, CONTEXTS, final_decision}}")
    truth: dict[str, str] | None = None
    if split == "test":
        cands = sorted(path.parent.glob("*test_ground_truth*.json"))
        if not cands:
            raise SafemergeError(f"--split test needs a *test_ground_truth*.json next to {path.name}",
                                 "put the PubMedQA test ground-truth file beside the PQA-L json or drop --split")
        truth = json.loads(cands[0].read_text(encoding="utf-8"))
    out = []
    for pmid, item in raw.items():
        if truth is not None and pmid not in truth:
            continue
        context = "\n".join(item.get("CONTEXTS") or [])
        answer = (truth or {}).get(pmid) or clean_cell(item.get("final_decision"))
        out.append(PromptRecord(
            prompt=f"Context: {context}\n\nQuestion: {item['QUESTION']}\n{PUBMEDQA_INSTRUCTION}",
            id=f"pubmedqa-{pmid}", category=None, answer=answer.lower() if answer else None,
            meta={"metric": "pubmedqa", "reference": clean_cell(item.get("LONG_ANSWER"))}))
    return out


def _choices(value: Any) -> list[str]:
    if isinstance(value, dict) and "text" in value:  # ARC / HF style {label: [...], text: [...]}
        return [str(t) for t in value["text"]]
    if isinstance(value, str):
        try:
            import json

            parsed = json.loads(value)
            if isinstance(parsed, list):
                return [str(x) for x in parsed]
        except ValueError:
            pass
        return [s.strip() for s in value.split("|")]
    return [str(x) for x in (value.tolist() if hasattr(value, "tolist") else value)]


def load_mc(raw: Any, path: Path, **_: Any) -> list[PromptRecord]:
    """Generic multiple choice: ``choices`` (list, ``a|b|c`` string or ``{text: [...]}``) + ``answer``
    (letter, 0-based index, or the correct option's text). Scored by option letter."""
    rows = _rows(raw, "mc", path)
    _require(rows, ("question", "choices", "answer"), "mc", path)
    out = []
    for i, r in enumerate(rows):
        opts = _choices(r["choices"])
        letters = [chr(ord("A") + k) for k in range(len(opts))]
        ans = r["answer"]
        if isinstance(ans, (int, float)) or (isinstance(ans, str) and ans.strip().isdigit()):
            if not (isinstance(ans, str) or float(ans).is_integer()) or not 0 <= int(ans) < len(letters):
                raise SafemergeError(f"{path.name} row {i}: answer index {ans!r} is outside the {len(opts)} choices",
                                     f"give a 0-based index below {len(opts)}, an option letter or the option text")
            letter = letters[int(ans)]
        elif isinstance(ans, str) and ans.strip().upper() in letters:
            letter = ans.strip().upper()
        elif isinstance(ans, str) and ans.strip() in opts:
            letter = letters[opts.index(ans.strip())]
        else:
            raise SafemergeError(f"{path.name} row {i}: answer {ans!r} is not a letter, index or option text",
                                 "give the answer as A/B/C…, a 0-based index or the exact option text")
        body = "\n".join(f"{lt}. {o}" for lt, o in zip(letters, opts))
        out.append(PromptRecord(prompt=f"{str(r['question']).strip()}\n{body}\n{MC_INSTRUCTION}",
                                id=_id(r, "mc", i), category=clean_cell(r.get("category") or r.get("subject")),
                                answer=letter, meta={"metric": "mc", "n_choices": len(opts)}))
    return out


def load_generic(raw: Any, path: Path, column: str | None = None, answer_column: str | None = None,
                 category_column: str | None = None, **_: Any) -> list[PromptRecord]:
    """Any table: the prompt column is ``column`` or the first of :data:`PROMPT_COLUMNS` present;
    a ``messages`` column (list of ``{role, content}``) is sent as a full chat."""
    rows = _rows(raw, "generic", path)
    if not rows:
        return []
    have = set(rows[0])
    if column is None and "messages" in have:
        column = "messages"
    pcol = column or next((c for c in PROMPT_COLUMNS if c in have), None)
    if pcol is None or pcol not in have:
        raise SafemergeError(f"{path.name}: no prompt column {('named ' + repr(column)) if column else 'found'}",
                             f"pass --column NAME; columns are: {', '.join(sorted(map(str, have)))}")
    for name, col in (("--answer-column", answer_column), ("--category-column", category_column)):
        if col is not None and col not in have:
            raise SafemergeError(f"{path.name}: {name} {col!r} is not a column",
                                 f"columns are: {', '.join(sorted(map(str, have)))}")
    acol = answer_column or next((c for c in ANSWER_COLUMNS if c in have), None)
    ccol = category_column or next((c for c in CATEGORY_COLUMNS if c in have), None)
    out = []
    for i, r in enumerate(rows):
        meta: dict[str, Any] = {}
        value = r.get(pcol)
        if pcol == "messages":
            msgs = list(value or [])
            if not msgs:
                continue
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise SafemergeError(f"{path.name} row {i}: 'messages' must be a list of {{role, content}} objects",
                                     'write each turn as {"role": "user", "content": "…"}')
            meta["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
            prompt = next((m["content"] for m in reversed(meta["messages"]) if m["role"] == "user"), "")
        else:
            prompt = clean_cell(value)
            if prompt is None:
                continue
        if r.get("metric"):
            meta["metric"] = r["metric"]
        label = clean_cell(r.get("label"))
        out.append(PromptRecord(prompt=prompt, id=_id(r, path.stem, i),
                                category=clean_cell(r.get(ccol)) if ccol else None,
                                answer=clean_cell(r.get(acol)) if acol else None,
                                label=label.lower() if label and label.lower() in ("safe", "unsafe") else None,
                                meta=meta))
    return out


Loader = Callable[..., list[PromptRecord]]

FORMATS: dict[str, Loader] = {
    "advbench": load_advbench,
    "harmbench": load_harmbench,
    "hexphi": lambda raw, path, **kw: load_hexphi_file(path),
    "directharm4": load_directharm4,
    "beavertails": load_beavertails,
    "strongreject": load_strongreject,
    "jbb": load_jbb,
    "xstest": load_xstest,
    "bianchi": load_bianchi,
    "gsm8k": load_gsm8k,
    "pubmedqa": load_pubmedqa,
    "mc": load_mc,
    "generic": load_generic,
}


def detect_format(raw: Any, path: Path) -> str:
    """Guess a named format from the file name and columns; ``generic`` when nothing matches."""
    if isinstance(raw, dict):
        return _detect_object_format(raw, path)
    if re.fullmatch(r"category_\d+", path.stem) and path.suffix.lower() == ".csv":
        return "hexphi"
    return _detect_row_format(_rows(raw, "any", path), path)


def _detect_object_format(raw: dict[str, Any], path: Path) -> str:
    """A file holding one JSON object: Bianchi's ``{instructions: [...]}`` or PubMedQA's PQA-L."""
    if "instructions" in raw:
        return "bianchi"
    if raw and all(isinstance(v, dict) and "QUESTION" in v for v in raw.values()):
        return "pubmedqa"
    raise SafemergeError(f"{path.name} holds a JSON object that is not a known prompt-set layout",
                         "use a JSON list / JSONL of rows, a Bianchi {instructions: [...]} file or a PQA-L file")


def _detect_row_format(rows: list[dict[str, Any]], path: Path) -> str:
    """A table of rows: the format its columns (and, for a few sets, its file name) identify."""
    cols = set(rows[0]) if rows else set()
    if {"goal", "target"} <= cols:
        return "advbench"
    if {"Behavior", "BehaviorID"} <= cols or {"Behavior", "SemanticCategory"} <= cols:
        return "harmbench"
    if {"Goal", "Behavior", "Category"} <= cols:
        return "jbb"
    if "forbidden_prompt" in cols:
        return "strongreject"
    if {"prompt", "type"} <= cols and ({"focus", "note"} & cols or "label" in cols):
        return "xstest"
    if {"question", "choices", "answer"} <= cols:
        return "mc"
    if {"question", "answer"} <= cols and any("####" in str(r.get("answer", "")) for r in rows[:20]):
        return "gsm8k"
    if {"instruction", "output"} <= cols:
        return "bianchi"
    if {"prompt", "is_safe"} <= cols or "beavertails" in path.name.lower():
        return "beavertails"
    if {"instruction", "category"} <= cols and "directharm" in path.name.lower():
        return "directharm4"
    return "generic"


def parse(raw: Any, *, path: Path, fmt: str | None, column: str | None, answer_column: str | None,
          category_column: str | None, split: str | None) -> list[PromptRecord]:
    """Dispatch ``raw`` (rows or a JSON object) to the loader of ``fmt`` (or the detected format)."""
    if fmt is None and (column or answer_column or category_column):
        fmt = "generic"
    name = (fmt or detect_format(raw, path)).lower().replace("-", "").replace("_", "")
    aliases = {"hexphi": "hexphi", "jailbreakbench": "jbb", "multiplechoice": "mc", "pqal": "pubmedqa"}
    name = aliases.get(name, name)
    if name not in FORMATS:
        raise SafemergeError(f"unknown prompt-set format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    return FORMATS[name](raw, path, column=column, answer_column=answer_column,
                         category_column=category_column, split=split)
