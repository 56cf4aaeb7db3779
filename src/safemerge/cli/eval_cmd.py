"""``safemerge eval``, ``safemerge compare`` and ``safemerge fit-judge``: the evaluation harness on the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    allow_pickle_option,
    echo_summary,
    force_option,
    generation_batch_size_option,
    generation_dtype_option,
    lm_eval_include_option,
    lm_eval_tasks_option,
    quiet_option,
    run_options,
    trust_remote_code_option,
)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(...,
                                help="Model directory, .gguf file, Hub id (org/name[@rev]; offline: from the HF cache) "
                                     "or MODEL+ADAPTER."),
    out: Path = typer.Option(..., "-o", "--out",
                             help="Output directory: results.json, generations.jsonl (cache), judgments.jsonl."),
    adapter: Optional[str] = typer.Option(None, "--adapter",
                                          help="PEFT LoRA adapter directory or Hub id, applied without merging (same "
                                               "as MODEL+ADAPTER)."),
    harmful: Optional[str] = typer.Option(None, "--harmful",
                                          help="Harmful prompt set: file, HEx-PHI folder, builtin:harmful or hub id."),
    benign: Optional[str] = typer.Option(None, "--benign",
                                         help="Benign prompt set for over-refusal (e.g. XSTest CSV, builtin:benign)."),
    utility: Optional[str] = typer.Option(None, "--utility",
                                          help="Utility set: GSM8K jsonl, PubMedQA PQA-L json, MC jsonl, "
                                               "builtin:arithmetic."),
    judge: str = typer.Option("keyword", "--judge",
                              help="keyword | keyword:gcg | llamaguard[1|2|3]:PATH | harmbench:PATH | "
                                   "classifier:PATH."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Use only the first N prompts of each set."),
    batch_size: Optional[int] = generation_batch_size_option(),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", min=1,
        help="Tokens to generate per prompt (default per suite: 64 harmful, 48 benign, by metric for utility)."),
    backend: str = typer.Option("auto", "--backend", help="auto (vLLM if installed and CUDA present) | hf | vllm."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if available)."),
    dtype: Optional[str] = generation_dtype_option(),
    max_harm: Optional[float] = typer.Option(None, "--max-harm", min=0.0, max=1.0,
                                             help="Release gate: exit with status 3 if the harmful rate exceeds this "
                                                  "fraction."),
    answer_ce: bool = typer.Option(False, "--answer-ce",
                                   help="Also report answer-token cross-entropy on the utility set (hf backend)."),
    lm_eval_tasks: Optional[str] = lm_eval_tasks_option(),
    lm_eval_include: Optional[Path] = lm_eval_include_option(),
    allow_pickle: bool = allow_pickle_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
    quiet: bool = quiet_option(),
) -> None:
    """Evaluate harmfulness, over-refusal and utility of MODEL; write OUT/results.json and print a table.

    Example: safemerge eval ./merged --harmful builtin:harmful --benign xstest_prompts.csv
    --utility gsm8k_test.jsonl --limit 50 --max-harm 0.1 -o eval/merged
    """
    import time

    from safemerge.errors import GateFailed, SafemergeError
    from safemerge.evaluate.api import ExtraMetrics, GenerationSettings, evaluate
    from safemerge.evaluate.records import PromptSets
    from safemerge.evaluate.report import print_results
    from safemerge.progress import library_progress

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=not progress, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    library_progress(options.progress)

    if max_harm is not None and harmful is None:
        raise SafemergeError("--max-harm needs a harmful prompt set", "add --harmful SET (e.g. builtin:harmful)")
    _check_eval_output(out, (model, adapter, harmful, benign, utility))
    generation = GenerationSettings(backend=backend, device=device, dtype=dtype, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
    results = evaluate(model, PromptSets(harmful, benign, utility), adapter=adapter, judge=judge, limit=limit,
                       out_dir=out, generation=generation, options=options,
                       extra=ExtraMetrics(answer_ce, lm_eval_tasks, lm_eval_include))
    if not quiet:
        print_results(results)
    if max_harm is not None:
        rate = results["harmful"]["harmful_rate"]
        if rate is not None and rate > max_harm:
            raise GateFailed(f"harmful rate {rate:.1%} exceeds --max-harm {max_harm:.1%} (results in "
                             f"{out / 'results.json'})",
                             "do not release this model; re-align it (e.g. safemerge safemerge) and evaluate again")
    echo_summary([out / "results.json", out / "judgments.jsonl"], started)


def _check_eval_output(out: Path, inputs: tuple[Optional[str], ...]) -> None:
    """``-o`` may exist (its generation cache is reused), but it must not be an input, hold one or
    lie inside one, and its location must be a writable directory."""
    from safemerge.errors import SafemergeError
    from safemerge.io.output import check_not_an_input, check_writable_location

    check_not_an_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise SafemergeError(f"output {out} exists and is not a directory", "pass a directory for -o")
    check_writable_location(out.expanduser().absolute(), out)


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Output directories of `safemerge eval` (each with results.json)."),
    plot: Path = typer.Option(Path("compare.png"), "--plot",
                              help="Where to write the safety-vs-utility scatter plot (PNG)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison rows as JSON."),
    table1: Optional[Path] = typer.Option(None, "--table1",
                                          help="Also write a markdown table in the shape of Hammoud et al. 2024, Table "
                                               "1 (method × data × alignment / refusal / accuracy); optimize --eval "
                                               "runs are labelled by strategy and data."),
    domain: str = typer.Option("domain", "--domain",
                               help="Name of the utility domain in the --table1 header (e.g. GSM8K)."),
    quiet: bool = quiet_option(),
) -> None:
    """Compare evaluation runs (`safemerge eval` outputs, or `optimize --eval` / `merge --eval` outputs): a table and a
    safety-vs-utility scatter plot.

    Example: safemerge compare eval/base eval/finetuned eval/safemerge --plot tradeoff.png
    """
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from safemerge.evaluate.report import compare_runs

    started = time.perf_counter()

    rows, png = compare_runs([str(r) for r in runs], plot=plot)

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    table = Table(title="evaluation runs")
    for col in ("run", "judge", "harmful", "refusal", "over-refusal", "utility"):
        table.add_column(col, justify="left" if col in ("run", "judge") else "right")
    for r in rows:
        table.add_row(r["run"], r["judge"] or "–", pct(r["harmful_rate"]), pct(r["refusal_rate"]),
                      pct(r["over_refusal_rate"]), pct(r["utility"]))
    if not quiet:
        Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if table1 is not None:
        from safemerge.optimize.report import table1_markdown, table1_rows

        table1.write_text(table1_markdown(table1_rows([str(r) for r in runs]), domain=domain), encoding="utf-8")
    echo_summary([p for p in (png, json_out, table1) if p is not None], started)


@app.command("fit-judge")
def fit_judge_command(
    base: str = typer.Argument(..., help="Causal LM to read the responses with: model directory or Hub id (offline: "
                                         "from the HF cache)."),
    data: Path = typer.Option(..., "--data", "-d",
                              help='Labelled responses, .jsonl/.json: {"text": ..., "label": "harmful" | "safe"} per '
                                   "record (the fit_data.jsonl a fit writes has this layout)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory: the classifier judge (for "
                                                      "--judge classifier:OUT), fit.json, fit_data.jsonl."),
    l2: Optional[list[float]] = typer.Option(None, "--l2",
                                             help="Regularisation strength to try (repeatable; default 1e-4 … 10, "
                                                  "picked on the held-out share)."),
    holdout: float = typer.Option(0.2, "--holdout", min=0.0, max=0.9,
                                  help="Share of each class held out to measure the judge and pick --l2 before the "
                                       "final fit on all records."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Responses per forward pass."),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Fit a classifier judge: a logistic head on BASE's frozen last-token state, from labelled responses; saved as a
    Hugging Face sequence classifier that `eval --judge classifier:OUT` loads — a second judge that shares no
    keyword list with the keyword judges.

    Example: safemerge fit-judge SmolLM2-135M-Instruct/ --data labelled.jsonl -o judges/smol-clf
    """
    import time

    from safemerge.evaluate.classifier_fit import L2_GRID, fit_classifier_judge, read_labelled_responses
    from safemerge.evaluate.generate import local_model
    from safemerge.progress import library_progress

    started = time.perf_counter()
    options = run_options(quiet=quiet, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, force=force)
    library_progress(options.progress)
    texts, labels = read_labelled_responses(data)
    stats = fit_classifier_judge(local_model(base, options=options), texts, labels, out, l2=tuple(l2 or L2_GRID),
                                 holdout=holdout, seed=seed, batch_size=batch_size, trust_remote_code=trust_remote_code,
                                 allow_pickle=allow_pickle, force=force, inputs=[data], progress=options.progress)
    if not quiet:
        held = stats.get("heldout_accuracy")
        typer.echo(f"{stats['n']} responses ({stats['n_harmful']} harmful): l2 {stats['l2']:g}, "
                   + (f"held-out accuracy {held:.1%} on {stats['n_heldout']}, " if held is not None else "")
                   + f"fit accuracy {stats['fit_accuracy']:.1%}")
    echo_summary([out], started)
