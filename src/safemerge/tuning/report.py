"""Automatic τ/α in words and tables: the Pareto front, the rule, the choice (console and Markdown rows)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from safemerge.tuning.result import AutotuneResult


def pareto_table(result: AutotuneResult) -> list[tuple[str, ...]]:
    """Rows ``(τ, α, merged layers, harmful, utility, over-refusal)`` of the Pareto front, chosen point marked; a
    late-block point shows ``blocks ≥ K`` for τ and its safety gain after α."""
    rows = []
    for p in result.pareto_front:
        mark = " ← chosen" if p.chosen else ""
        refusal = "–" if p.over_refusal is None else f"{100 * p.over_refusal:.1f}%"
        where = f"blocks ≥ {p.min_layer}" if p.min_layer else f"{p.tau:g}"
        weight = f"{p.alpha:g}" + (f" (g {p.safety_gain:g})" if p.safety_gain != 1.0 else "")
        rows.append((where, weight, f"{len(p.merged)}/{len(result.rhos)}",
                     f"{100 * (p.harmful_rate or 0):.1f}%", f"{100 * (p.utility or 0):.1f}%{mark}", refusal))
    return rows


def rule_text(result: AutotuneResult) -> str:
    """The constraints in words, e.g. ``harmful ≤ aligned 12.5% + 3 pts, over-refusal ≤ aligned 14.0% + 5 pts``."""
    text = f"harmful ≤ aligned {100 * (result.aligned['harmful_rate'] or 0):.1f}% + {100 * result.harm_margin:g} pts"
    if result.refusal_margin is not None:
        text += (f", over-refusal ≤ aligned {100 * (result.aligned.get('over_refusal') or 0):.1f}% + "
                 f"{100 * result.refusal_margin:g} pts")
    return text


def print_pareto(result: AutotuneResult, console: Console | None = None) -> None:
    """Print the Pareto front and the choice with rich."""
    con = console or Console(stderr=False)
    t = Table(title=f"automatic τ/α — Pareto front on validation ({rule_text(result)})")
    for col in ("τ", "α", "merged", "harmful", "utility", "over-refusal"):
        t.add_column(col, justify="right")
    for row in pareto_table(result):
        t.add_row(*row)
    con.print(t)
    c = result.chosen
    note = "" if result.constraint_met else " (no point met the constraints: the one closest to them chosen)"
    refusal = "" if c.over_refusal is None else f", over-refusal {100 * c.over_refusal:.1f}%"
    con.print(f"chosen: {c.describe()} — validation harmful {100 * (c.harmful_rate or 0):.1f}%, "
              f"utility {100 * (c.utility or 0):.1f}%{refusal}{note}")
