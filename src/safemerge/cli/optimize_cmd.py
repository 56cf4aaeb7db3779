"""``safemerge optimize``: safety-aware data-driven merging (EvoMM / LM-Cocktail / grid; Hammoud et al. 2024)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    out_option,
    output_alias_option,
    pick_out,
    quiet_option,
    run_options,
    trust_remote_code_option,
)


@app.command("optimize", no_args_is_help=True)
def optimize_cmd(
    config: Path = typer.Argument(...,
                                  help="Optimize YAML: genome / data / objective / cma blocks (see docs/optimize.md)."),
    out: Optional[Path] = out_option("Output directory: best.yml, trace.jsonl, trace.png, report.md, model/."),
    output: Optional[Path] = output_alias_option(),
    strategy: Optional[str] = typer.Option(None, "--strategy",
                                           help="evomm (CMA-ES), cocktail (LM-Cocktail) or grid; default: the "
                                                "config's."),
    ray: bool = typer.Option(False, "--ray",
                             help="Evaluate candidates in parallel on Ray actors (local Ray instance)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Address of a running Ray cluster (implies --ray)."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", min=1,
                                              help="Number of Ray actors (default: the config's ray.workers)."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted run of the same config into the same output."),
    force: bool = force_option("Replace an existing output (and discard an interrupted run)."),
    no_save_model: bool = typer.Option(False, "--no-save-model",
                                       help="Do not write the merged model (only best.yml and the trace)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
    eval_: bool = eval_flag_option("Evaluate the merged model (alignment, refusal, utility) into OUT/eval and add its "
                                   "Table-1 row to report.md."),
    eval_harmful: str = eval_harmful_option(),
    eval_benign: str = eval_benign_option(),
    eval_utility: str = eval_utility_option(),
    eval_judge: str = eval_judge_option(),
    eval_limit: int = eval_limit_option(),
    eval_lm_eval_tasks: str = lm_eval_tasks_option("--eval-lm-eval-tasks"),
    eval_lm_eval_include: Path = lm_eval_include_option("--eval-lm-eval-include"),
) -> None:
    """Search merge parameters that minimise L_safety + α·L_expert, and write the best merge.

    Example: safemerge optimize evolve.yml -o runs/evomm --strategy evomm --eval --eval-utility test.jsonl
    """
    import json
    import time

    from safemerge.optimize.runner import RayPool, run_optimize
    from safemerge.progress import library_progress

    started, output = time.perf_counter(), pick_out(out, output)
    options = run_options(quiet=quiet, no_progress=no_progress, device=device, force=force, allow_pickle=allow_pickle,
                          allow_nonfinite=allow_nonfinite, trust_remote_code=trust_remote_code)
    library_progress(options.progress)
    sets = EvalSets(eval_harmful, eval_benign, eval_utility, eval_judge, eval_limit,
                    options=run_options(no_progress=not options.progress, trust_remote_code=trust_remote_code),
                    lm_eval_tasks=eval_lm_eval_tasks, lm_eval_include=eval_lm_eval_include)

    def evaluator(model: Path, eval_dir: Path) -> dict:  # --eval: runs before OUT is renamed into place
        return sets.evaluate(model, eval_dir, device=device)

    pool = RayPool(ray_address, ray_workers) if ray or ray_address else None
    summary = run_optimize(config, output, strategy=strategy, ray=pool, resume=resume, save_model=not no_save_model,
                           options=options, evaluate=evaluator if eval_ else None)
    keys = ("strategy", "merge_method", "evaluations", "best_loss", "seconds_per_candidate", "candidates_per_hour")
    if not quiet:
        typer.echo(json.dumps({k: summary.get(k) for k in keys}))
        if summary.get("evaluation"):
            from safemerge.optimize.report import table1_markdown

            typer.echo(table1_markdown([summary["evaluation"]]).rstrip())
    echo_summary(output, started, detail=f"best.yml, trace.jsonl{'' if no_save_model else ', model/'}; "
                 f"{summary.get('evaluations')} evaluations, best loss {summary.get('best_loss')}")

