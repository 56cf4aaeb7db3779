"""Reports: a terminal table, a markdown section for model cards, and a cross-run comparison plot."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safemerge.errors import SafemergeError
from safemerge.io.output import atomic_save_figure, md_code
from safemerge.io.text import read_utf8

LM_EVAL_SUITE = "lm-eval"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "–" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def rate_with_ci(x: float | None, ci: list[float] | None) -> str:
    """``0.125, [0.05, 0.225]`` → ``"12.5% [5.0, 22.5]"`` (``—`` when not measured)."""
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


@dataclass
class ModelRow:
    """One evaluated model of a comparison table (``safemerge demo``, ``safemerge repair``): its name, how it was
    made, where it is (``model`` + ``adapter``) and its ``results.json`` object."""

    name: str
    how: str
    model: str | None = None
    adapter: str | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def metric(self, suite: str, key: str) -> float | None:
        return (self.results.get(suite) or {}).get(key)

    def cells(self) -> tuple[str, str, str]:
        """Harmful rate, over-refusal and utility as ``"12.5% [5.0, 22.5]"`` (— when not measured)."""
        return (rate_with_ci(self.metric("harmful", "harmful_rate"), self.metric("harmful", "ci")),
                rate_with_ci(self.metric("benign", "over_refusal_rate"), self.metric("benign", "ci")),
                rate_with_ci(self.metric("utility", "accuracy"), self.metric("utility", "ci")))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "how": self.how, "model": self.model, "adapter": self.adapter,
            "harmful_rate": self.metric("harmful", "harmful_rate"), "harmful_ci": self.metric("harmful", "ci"),
            "refusal_rate": self.metric("harmful", "refusal_rate"),
            "over_refusal_rate": self.metric("benign", "over_refusal_rate"),
            "over_refusal_ci": self.metric("benign", "ci"),
            "utility": self.metric("utility", "accuracy"), "utility_ci": self.metric("utility", "ci"),
            "n": {s: self.metric(s, "n") for s in ("harmful", "benign", "utility")},
        }


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``(suite, metric, value, 95% CI, n)`` rows of one results object (values formatted)."""
    rows: list[tuple[str, str, str, str, str]] = []
    h = results.get("harmful")
    if h:
        rows.append(("harmful", f"harmful rate ({h.get('judge', '?')})", _pct(h["harmful_rate"]), _ci(h.get("ci")),
                     str(h["n"])))
        rows.append(("harmful", "refusal rate", _pct(h["refusal_rate"]), _ci(h.get("refusal_ci")), str(h["n"])))
    b = results.get("benign")
    if b:
        rows.append(("benign", "over-refusal rate", _pct(b["over_refusal_rate"]), _ci(b.get("ci")), str(b["n"])))
        if "unsafe_refusal_rate" in b:
            rows.append(("benign", "refusal rate on unsafe contrasts", _pct(b["unsafe_refusal_rate"]),
                         _ci(b.get("unsafe_ci")), str(b["unsafe_n"])))
    u = results.get("utility")
    if u:
        metric = u.get("metric")
        name = metric if isinstance(metric, str) else "mixed"
        rows.append(("utility", f"accuracy ({name})", _pct(u["accuracy"]), _ci(u.get("ci")), str(u["n"])))
        if u.get("answer_ce") is not None:
            ci = u.get("answer_ce_ci")
            rows.append(("utility", "answer-token CE (nats)", f"{u['answer_ce']:.3f}",
                         f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–", str(u["n"])))
    rows += _lm_eval_rows(results.get("lm_eval") or {})
    return rows


def _lm_eval_rows(lm: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One row per lm-eval task metric: the value and ± its standard error as lm-eval reports them."""
    rows = []
    for task, entry in (lm.get("tasks") or {}).items():
        for metric, value in entry.get("metrics", {}).items():
            err = entry.get("stderr", {}).get(metric)
            rows.append((f"{LM_EVAL_SUITE} {task}", metric, "–" if value is None else f"{value:.4f}",
                         "–" if err is None else f"± {err:.4f} (s.e.)", str(entry.get("n") or "–")))
    return rows


def print_results(results: dict[str, Any], console: Any = None) -> None:
    """Print :func:`summary_rows` as a rich table (plus per-category harmful rates)."""

    console = console or Console()
    settings = results.get("settings") or {}
    adapter = f" + {results['adapter']}" if results.get("adapter") else ""
    table = Table(title=f"safety evaluation: {results.get('model')}{adapter} "
                        f"({settings.get('backend', '?')}, {settings.get('dtype', '?')})")
    for col in ("suite", "metric", "value", "95% CI", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for row in summary_rows(results):
        table.add_row(*row)
    console.print(table)
    cats = (results.get("harmful") or {}).get("categories") or {}
    if len(cats) > 1:
        t2 = Table(title="harmful rate by category")
        for col in ("category", "harmful", "refusal", "n"):
            t2.add_column(col, justify="left" if col == "category" else "right")
        for cat, e in cats.items():
            t2.add_row(cat, _pct(e.get("harmful_rate")), _pct(e.get("refusal_rate")), str(e["n"]))
        console.print(t2)


def results_markdown(results: dict[str, Any]) -> str:
    """A ``## Safety evaluation`` markdown section for a model card (README.md)."""
    lines = ["## Safety evaluation", "",
             "| Suite | Metric | Value | 95% CI | n |", "|---|---|---:|---|---:|"]
    for suite, metric, value, ci, n in summary_rows(results):
        set_name = (results.get(suite) or {}).get("set") or suite.removeprefix(LM_EVAL_SUITE).strip()
        label = LM_EVAL_SUITE if suite.startswith(LM_EVAL_SUITE) else suite
        lines.append(f"| {label} ({md_code(set_name, in_table=True)}) | {metric} | {value} | {ci} | {n} |")
    settings = results.get("settings", {})
    mnt = settings.get("max_new_tokens", {})
    lines += ["",
              f"Greedy decoding ({settings.get('backend', '?')} backend, {settings.get('dtype', '?')}), "
              "max new tokens "
              + ", ".join(f"{k} {v}" for k, v in mnt.items())
              + f"; 95% percentile-bootstrap intervals; safemerge {results.get('safemerge_version', '?')}.",
              "Harmful rate = share of responses to harmful prompts that the judge flags; over-refusal = share of "
              "benign prompts refused (keyword refusal detection unless the judge reports refusals).", ""]
    lm = results.get("lm_eval")
    if lm:
        st = lm.get("settings", {})
        lines += [f"lm-eval rows: lm-evaluation-harness {st.get('lm_eval_version', '?')} on the same model, "
                  f"tasks {', '.join(md_code(t) for t in st.get('tasks', []))}"
                  + (f", at most {st['limit']} documents each" if st.get("limit") else "")
                  + "; ± is lm-eval's standard error.", ""]
    return "\n".join(lines)


def load_results(run: str | Path) -> dict[str, Any]:
    """``RUN/results.json`` (or the JSON file itself; ``RUN/eval/results.json`` for a
    ``safemerge optimize --eval`` / ``merge --eval`` output)."""
    p = Path(run).expanduser()
    f = p / "results.json" if p.is_dir() else p
    if p.is_dir() and not f.is_file() and (p / "eval" / "results.json").is_file():
        f = p / "eval" / "results.json"
    if not f.is_file():
        raise SafemergeError(f"no results.json in {run}", "pass output directories of `safemerge eval`")

    try:
        res = json.loads(read_utf8(f, "results file"))
    except json.JSONDecodeError as exc:
        raise SafemergeError(f"{f} is not valid JSON ({exc.msg})", "re-run `safemerge eval` to rewrite it") from exc
    suites = ("harmful", "benign", "utility")
    if not isinstance(res, dict) or not all(isinstance(res.get(s) or {}, dict) for s in suites):
        raise SafemergeError(f"{f} is not a `safemerge eval` results object", "re-run `safemerge eval` to rewrite it")
    return res


def _value(results: dict[str, Any], suite: str, key: str) -> float | None:
    return (results.get(suite) or {}).get(key)


def compare_runs(dirs: list[str | Path], plot: str | Path | None = "compare.png") -> tuple[list[dict[str, Any]],
                                                                                           Path | None]:
    """One row per run (``run``, ``harmful_rate``, ``refusal_rate``, ``over_refusal_rate``,
    ``utility``, ``n_*``) and a safety-vs-utility scatter plot (PNG, written atomically).

    The plot's x axis is the harmful rate (lower is safer); the y axis is utility accuracy, or
    1 − over-refusal rate when no run has a utility suite. ``plot=None`` skips the plot.
    """
    if not dirs:
        raise SafemergeError("nothing to compare", "pass one or more output directories of `safemerge eval`")
    rows = []
    for d in dirs:
        res = load_results(d)
        rows.append({
            "run": Path(d).name or str(d),
            "model": res.get("model"),
            "judge": (res.get("harmful") or {}).get("judge"),
            "harmful_rate": _value(res, "harmful", "harmful_rate"),
            "harmful_ci": _value(res, "harmful", "ci"),
            "refusal_rate": _value(res, "harmful", "refusal_rate"),
            "over_refusal_rate": _value(res, "benign", "over_refusal_rate"),
            "utility": _value(res, "utility", "accuracy"),
            "utility_ci": _value(res, "utility", "ci"),
            "n_harmful": _value(res, "harmful", "n"),
            "n_benign": _value(res, "benign", "n"),
            "n_utility": _value(res, "utility", "n"),
        })
    if plot is None:
        return rows, None
    return rows, _scatter(rows, Path(plot).expanduser())


def _scatter(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_utility = any(r["utility"] is not None for r in rows)
    ylabel = "utility accuracy" if use_utility else "1 − over-refusal rate"
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in rows:
        x = r["harmful_rate"]
        y = r["utility"] if use_utility else (None if r["over_refusal_rate"] is None else 1 - r["over_refusal_rate"])
        if x is None or y is None:
            continue
        xerr = None
        if r["harmful_ci"]:
            xerr = [[max(0.0, x - r["harmful_ci"][0])], [max(0.0, r["harmful_ci"][1] - x)]]
        yerr = None
        if use_utility and r["utility_ci"]:
            yerr = [[max(0.0, y - r["utility_ci"][0])], [max(0.0, r["utility_ci"][1] - y)]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("harmful rate (lower is safer)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("safety vs utility")
    fig.tight_layout()

    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
