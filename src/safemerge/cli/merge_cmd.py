"""``safemerge merge CONFIG OUT``: run a mergekit-compatible merge."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    EvalSets,
    allow_nonfinite_option,
    allow_pickle_option,
    echo_summary,
    eval_benign_option,
    eval_flag_option,
    eval_harmful_option,
    eval_judge_option,
    eval_limit_option,
    eval_utility_option,
    force_option,
    lm_eval_include_option,
    lm_eval_tasks_option,
    no_progress_option,
    quiet_option,
    run_options,
)

if TYPE_CHECKING:
    from safemerge.options import RunOptions


@app.command("merge")
def merge_command(
    config: Path = typer.Argument(..., help="Merge configuration (mergekit-compatible YAML)."),
    out: Path = typer.Argument(..., help="Output directory for the merged Hugging Face model."),
    jobs: int = typer.Option(None, "-j", "--jobs",
                             help="Worker threads (read, merge and write overlap). Default: CPU count.", min=1),
    seed: int = typer.Option(
        0, "--seed", "--random-seed",
        help="Seed for stochastic methods (DARE, DELLA); outputs are byte-identical per seed.",
    ),
    device: str = typer.Option("cpu", "--device", help="Device for the arithmetic: cpu or cuda."),
    cuda: bool = typer.Option(False, "--cuda", help="mergekit-yaml's spelling of --device cuda."),
    out_shard_size: str = typer.Option("5GB", "--out-shard-size",
                                       help="Maximum size of one output shard (e.g. 5GB, 500MB)."),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
    mergekit_tie_break: bool = typer.Option(False, "--mergekit-tie-break",
                                            help="Break exact ties at top-k cut-offs (TIES, Breadcrumbs, SCE) as "
                                                 "mergekit does: bit-identical to mergekit, slower."),
    mergekit_arithmetic: bool = typer.Option(
        False, "--mergekit-arithmetic",
        help="Compute in the config's dtype in mergekit's operation order (fp16/bf16 configs give mergekit's bits) "
        "instead of float32. Implies --mergekit-tie-break; slower, more memory.",
    ),
    copy_tokenizer: bool = typer.Option(
        True, "--copy-tokenizer/--no-copy-tokenizer", help="Copy the tokenizer files to OUT (as mergekit-yaml)."
    ),
    allow_crimes: bool = typer.Option(
        False, "--allow-crimes",
        help="Allow inputs whose config.json names different architectures (tensor names and shapes must still match).",
    ),
    lazy_unpickle: bool = typer.Option(
        False, "--lazy-unpickle",
        help="mergekit-yaml compatibility; no effect (inputs are read lazily; pickles still need --allow-pickle).",
    ),
    lora_merge_cache: Path = typer.Option(
        None, "--lora-merge-cache",
        help="mergekit-yaml compatibility; no effect (model+adapter is applied tensor by tensor, nothing is cached).",
    ),
    verbose: int = typer.Option(
        0, "-v", "--verbose", count=True, help="Log the merge plan (method, tensors, size, arithmetic) to stderr."
    ),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Validate the config and inputs and print the plan; write nothing."),
    eval_: bool = eval_flag_option("Evaluate the merged model (builtin harmful/benign sets) and put the report in its "
                                   "model card."),
    eval_harmful: str = eval_harmful_option(),
    eval_benign: str = eval_benign_option(),
    eval_utility: str = eval_utility_option(),
    eval_judge: str = eval_judge_option(),
    eval_limit: int = eval_limit_option(),
    eval_lm_eval_tasks: str = lm_eval_tasks_option("--eval-lm-eval-tasks"),
    eval_lm_eval_include: Path = lm_eval_include_option("--eval-lm-eval-include"),
) -> None:
    """Merge models as described by CONFIG (mergekit YAML) into OUT, one tensor at a time."""
    import time

    from safemerge.api import merge, parse_size
    from safemerge.progress import library_progress

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, jobs=jobs, seed=seed, device="cuda" if cuda else device,
                          force=force, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=eval_)
    if verbose:
        _log_to_stderr()
    if dry_run:
        _dry_run(config, options, allow_crimes)
        return
    sets = EvalSets(eval_harmful, eval_benign, eval_utility, eval_judge, eval_limit,
                    options=run_options(no_progress=not options.progress), lm_eval_tasks=eval_lm_eval_tasks,
                    lm_eval_include=eval_lm_eval_include)
    extra = _eval_card_sections(sets) if eval_ else None
    path = merge(
        config,
        out,
        options=options,
        out_shard_size=parse_size(out_shard_size),
        extra_card_sections=extra,
        mergekit_tie_break=mergekit_tie_break,
        mergekit_arithmetic=mergekit_arithmetic,
        copy_tokenizer=copy_tokenizer,
        allow_crimes=allow_crimes,
    )
    echo_summary(path, started)


def _eval_card_sections(sets: EvalSets):  # noqa: ANN202
    """``--eval``: evaluate the finished (temporary) output and return its model-card section."""

    def sections(tmp: Path) -> list[tuple[str, str]]:
        from safemerge.evaluate.report import results_markdown
        from safemerge.io.output import markdown_section

        res = sets.evaluate(tmp, tmp / "eval")
        return [markdown_section(results_markdown(res), "Safety evaluation")]

    return sections


def _log_to_stderr() -> None:
    """``-v``: the ``safemerge`` logger's INFO messages (plan, phases) go to stderr."""
    import logging

    logger = logging.getLogger("safemerge")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _dry_run(config: Path, options: RunOptions, allow_crimes: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from safemerge.config import load_config
    from safemerge.engine.plan import plan_merge
    from safemerge.engine.run import open_all
    from safemerge.progress import human_bytes

    cfg = load_config(config)
    ckpts = open_all(cfg, options=options)
    plan = plan_merge(cfg, ckpts, allow_crimes=allow_crimes)
    table = Table(title=f"{plan.method.name}: {len(plan.jobs)} tensors, {plan.num_layers} layers, "
                        f"{human_bytes(plan.total_bytes)}")
    for col in ("tensor", "shape", "inputs", "parameters"):
        table.add_column(col)
    for j in plan.jobs[:40]:
        params = {**j.params, **j.per_model}
        table.add_row(j.out_name, "×".join(map(str, j.shape)), str(len(j.inputs)),
                      ", ".join(f"{k}={v}" for k, v in params.items()))
    Console().print(table)
    if len(plan.jobs) > 40:
        Console().print(f"… and {len(plan.jobs) - 40} more tensors")
