"""Reports of safety-aware merging: a Table-1-shaped markdown table and the optimisation trace plot.

The table has the shape of Hammoud et al. 2024, Table 1: one row per (merging method, data the
method used — "–" for data-free grid search, ``D_exp`` or ``D_exp ∪ D_safe``) with the alignment
(% of answers to harmful prompts judged safe), the refusal rate and the domain accuracy, as
produced by :func:`safemerge.evaluate.api.evaluate`.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from safemerge.errors import SafemergeError
from safemerge.evaluate.report import load_results


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100.0 * float(v):.1f}"


def row_from_eval(method: str, data: str, result: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A table row from an evaluation-harness result (``harmful.harmful_rate``/``refusal_rate``,
    ``utility.accuracy``)."""
    harmful = result.get("harmful") or {}
    utility = result.get("utility") or {}
    hr, hci = harmful.get("harmful_rate"), harmful.get("ci")
    row: dict[str, Any] = {
        "method": method,
        "data": data,
        "alignment": None if hr is None else 1.0 - float(hr),
        "refusal_rate": harmful.get("refusal_rate"),
        "accuracy": utility.get("accuracy"),
    }
    if hci:  # the harness's bootstrap interval of the harmful rate, turned into one of the safe share
        row["alignment_ci"] = [round(1.0 - float(hci[1]), 6), round(1.0 - float(hci[0]), 6)]
    if utility.get("ci"):
        row["accuracy_ci"] = list(utility["ci"])
    return {**row, **extra}


#: per-row statistics that are rendered inside the Align / Refusal / Acc cells, not as columns
_CELL_STATS = ("alignment_ci", "accuracy_ci", "alignment_sd", "accuracy_sd", "refusal_rate_sd", "seeds")


def mean_over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from the rows of the same method and data under several seeds: means, sample SDs, ``seeds``.

    The spread across seeds (SD, and ``*_range``) is the seed-to-seed variation of the whole pipeline
    (search + evaluation); the per-seed bootstrap intervals stay in the individual rows.
    """

    if not rows:
        raise ValueError("no rows to average")
    out: dict[str, Any] = {"method": rows[0].get("method"), "data": rows[0].get("data"), "seeds": len(rows)}
    for key in ("alignment", "refusal_rate", "accuracy", "s_per_cand", "cand_per_h"):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if not vals:
            continue
        out[key] = statistics.fmean(vals)
        if key in ("alignment", "refusal_rate", "accuracy"):
            out[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[f"{key}_range"] = [min(vals), max(vals)]
    return out


def _stat_cell(row: Mapping[str, Any], key: str) -> str:
    """``mean ± sd`` over seeds, ``value [lo, hi]`` with a 95% interval, or the bare percentage."""
    cell = _pct(row.get(key))
    if row.get(f"{key}_sd") is not None and row.get(key) is not None:
        return f"{cell} ± {100.0 * float(row[f'{key}_sd']):.1f}"
    ci = row.get(f"{key}_ci")
    if ci and row.get(key) is not None:
        return f"{cell} [{_pct(ci[0])}, {_pct(ci[1])}]"
    return cell


_METHOD_NAMES = {"ties": "TIES", "dare_ties": "DARE-TIES", "slerp": "SLERP", "linear": "Linear",
                 "task_arithmetic": "Task arithmetic"}
_STRATEGY_NAMES = {"evomm": "EvoMM", "grid": "grid search"}


def method_label(strategy: str, merge_method: str) -> str:
    """Table-1 method name of an optimize run, e.g. ``TIES EvoMM``, ``DARE-TIES grid search``, ``LM-Cocktail``."""
    if strategy == "cocktail":
        return "LM-Cocktail"
    return f"{_METHOD_NAMES.get(merge_method, merge_method)} {_STRATEGY_NAMES.get(strategy, strategy)}"


def data_label(n_safety: int, n_expert: int) -> str:
    """Table-1 data column: which synthetic sets the objective used (``D_exp``, ``D_safe``, ``D_exp ∪ D_safe``)."""
    parts = [name for name, n in (("D_exp", n_expert), ("D_safe", n_safety)) if n]
    return " ∪ ".join(parts) if parts else "–"


def table1_rows(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Table-1 rows from output directories: ``safemerge optimize --eval`` runs (the row stored in
    ``summary.json``) or ``safemerge eval`` runs (named by folder)."""

    rows = []
    for run in runs:
        p = Path(run).expanduser()
        summary_f = p / "summary.json"
        if summary_f.is_file() and (p / "best.yml").is_file():
            summary = json.loads(summary_f.read_text(encoding="utf-8"))
            if not summary.get("evaluation"):
                raise SafemergeError(f"optimize run {str(run)!r} has no evaluation of its merged model",
                                     "rerun it with --eval, or evaluate OUT/model with `safemerge eval` and compare "
                                     "that")
            rows.append({**summary["evaluation"], "s_per_cand": summary.get("seconds_per_candidate"),
                         "cand_per_h": summary.get("candidates_per_hour")})
        else:
            rows.append(row_from_eval(p.name or str(run), "–", load_results(p)))
    return rows


def table1_markdown(rows: Sequence[Mapping[str, Any]], *, domain: str = "domain") -> str:
    """Markdown table: Method | Data | Align (%) | Refusal (%) | Acc (%) [| extra numeric columns].

    A cell shows ``mean ± sd`` for a row averaged over seeds (:func:`mean_over_seeds`), else
    ``value [lo, hi]`` when the row carries the harness's 95% interval (``*_ci``, from :func:`row_from_eval`).
    """
    fixed = ("method", "data", "alignment", "refusal_rate", "accuracy", *_CELL_STATS)
    extra_cols = list(dict.fromkeys(k for r in rows for k in r if k not in fixed and not k.endswith("_range")))
    head = ["Method", "Data", "Align (% safe)", "Refusal (%)", f"Acc {domain} (%)", *extra_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = str(r.get("method", "")) + (f" ({r['seeds']} seeds)" if r.get("seeds") else "")
        cells = [method, str(r.get("data", "–")), _stat_cell(r, "alignment"), _stat_cell(r, "refusal_rate"),
                 _stat_cell(r, "accuracy")]
        for k in extra_cols:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_trace(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "optimisation trace") -> Path:
    """PNG of every evaluation's loss (dots, with the safety/expert parts) and the best-so-far curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(r.get("eval", i)) for i, r in enumerate(rows)]
    loss = [float(r["loss"]) for r in rows]
    best, cur = [], math.inf
    for v in loss:
        cur = min(cur, v)
        best.append(cur)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.scatter(xs, loss, s=10, alpha=0.6, label="L = L_safety + α·L_expert")
    for key, lab in (("safety_loss", "L_safety"), ("expert_loss", "L_expert")):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.scatter([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], s=6,
                       alpha=0.4, label=lab)
    ax.plot(xs, best, color="black", linewidth=1.5, label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p


def run_report_markdown(summary: Mapping[str, Any], best_config: Mapping[str, Any]) -> str:
    """``report.md`` of one optimize run: summary numbers, the best config, the trace plot and,
    after ``--eval``, the merged model's Table-1 row (``summary["evaluation"]``)."""

    lines = [f"# safemerge optimize — {summary.get('strategy')}", ""]
    for k, v in summary.items():
        if k == "evaluation":  # rendered as a table below
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv:.4g}" if isinstance(vv, float) else f"{kk}: {vv}" for kk, vv in v.items())
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Best configuration (`best.yml`)", "", "```yaml",
              yaml.safe_dump(dict(best_config), sort_keys=False).rstrip(), "```", "",
              "![trace](trace.png)", ""]
    row = summary.get("evaluation")
    if row:
        lines += ["## Evaluation of the merged model (`eval/results.json`)", "",
                  "Alignment = 1 − harmful rate on the harmful prompts; Acc = utility accuracy "
                  "(Hammoud et al. 2024, Table 1 columns).", "", table1_markdown([row]).rstrip(), ""]
    return "\n".join(lines)
