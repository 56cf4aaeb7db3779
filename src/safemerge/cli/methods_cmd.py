"""``safemerge methods``: list the registered merge methods and their parameters."""
from __future__ import annotations

from typing import Optional

import typer

from safemerge.cli import app


@app.command("methods")
def methods_command(
    name: Optional[str] = typer.Argument(None, help="Show the parameters of this method (e.g. ties)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List merge methods (mergekit-compatible and safety-aware), or one method's parameters.

    Examples:

        safemerge methods

        safemerge methods ties

        safemerge methods --json
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from safemerge.methods import all_methods, get_method

    methods = {name: get_method(name)} if name else dict(sorted(all_methods().items()))

    def pdesc(p) -> dict:  # noqa: ANN001
        return {
            "name": p.name,
            "scope": "per-model" if p.per_model else "global",
            "type": p.kind.__name__,
            "default": None if p.required else p.default,
            "required": p.required,
            "range": _range(p),
            "help": p.help,
        }

    if as_json:
        data = [
            {
                "name": m.name,
                "base": m.base,
                "base_in_tensors": bool(m.extra.get("base_in_tensors", False)),
                "min_models": m.min_models,
                "max_models": m.max_models,
                "stochastic": m.stochastic,
                "reference": m.reference,
                "params": [pdesc(p) for p in m.params],
            }
            for m in methods.values()
        ]
        typer.echo(json.dumps(data if not name else data[0], indent=2))
        return
    console = Console()
    if not name:
        table = Table(title="merge methods")
        for col in ("method", "base", "models", "parameters", "reference"):
            table.add_column(col, overflow="fold")
        for m in methods.values():
            if m.max_models is None:
                models = f"{m.min_models}+"
            else:
                models = str(m.min_models) if m.min_models == m.max_models else f"{m.min_models}-{m.max_models}"
            base = m.base + (" (in inputs)" if m.extra.get("base_in_tensors") else "")
            table.add_row(m.name + (" *" if m.stochastic else ""), base, models, ", ".join(p.name for p in m.params),
                          m.reference)
        console.print(table)
        console.print("* stochastic: reproducible with --seed.  `safemerge methods NAME` shows one method's "
                      "parameters.")
        return
    m = methods[name]
    console.print(f"[bold]{m.name}[/bold] — {m.reference}")
    console.print(f"base model: {m.base}" + ("; the base is one of the averaged "
                                             "inputs" if m.extra.get("base_in_tensors") else ""))
    table = Table()
    for col in ("parameter", "scope", "type", "default", "range", "description"):
        table.add_column(col, overflow="fold")
    for p in m.params:
        d = pdesc(p)
        table.add_row(d["name"], d["scope"], d["type"], "required" if p.required else repr(d["default"]), d["range"],
                      d["help"])
    console.print(table)


def _range(p) -> str:  # noqa: ANN001
    if p.kind is bool or (p.low is None and p.high is None):
        return ""
    lo = "-inf" if p.low is None else f"{p.low:g}"
    hi = "inf" if p.high is None else f"{p.high:g}"
    return f"{'(' if p.low_open else '['}{lo}, {hi}{')' if p.high is None else ']'}"
