"""Safety commands: ``scan``, ``safemerge``, ``safelora``, ``resta``, ``mergealign``.

Thin wrappers over :mod:`safemerge.safety.api`; torch is imported inside the command bodies.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    EvalSets,
    allow_nonfinite_option,
    allow_pickle_option,
    dtype_option,
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
from safemerge.methods.safety_params import (
    MERGEALIGN_LAMBDA_ALIGNED,
    MERGEALIGN_LAMBDA_DOMAIN,
    RESTA_BETA,
    SAFELORA_NUM_LAYERS,
    SAFELORA_TAU,
    SAFEMERGE_ALPHA,
    SAFEMERGE_DENSITY,
    SAFEMERGE_MIN_LAYER,
    SAFEMERGE_SAFETY_GAIN,
    SAFEMERGE_TAU,
)
from safemerge.tuning.grid import DEFAULT_HARM_MARGIN, DEFAULT_REFUSAL_MARGIN, SearchSettings

if TYPE_CHECKING:
    from safemerge.progress import StageCallback

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
_BASE_HELP = ("Unaligned base model (pre-trained), used with --aligned to build the safety subspace "
              "V = W_aligned − W_base.")
_ALIGNED_HELP = "Safety-aligned model the adapters were trained on (e.g. the chat/instruct model)."


@contextlib.contextmanager
def progress_callback(enabled: bool) -> Iterator[StageCallback]:
    """Progress bars on stderr driven by ``cb(stage, done, total)`` (one line per stage, cleared at the end)."""
    from safemerge.progress import progress_bar

    with progress_bar("", total=None, enabled=enabled, unit="", transient=True) as bar:
        yield bar.stage


def _print_scores(scores: list, tau: float | None, decision: str) -> None:
    from rich.console import Console
    from rich.table import Table

    multi = len({s.source for s in scores}) > 1
    title = "safety similarity ρ = cos(CΔW, ΔW)" + (f", τ = {tau:g}" if tau is not None else "")
    table = Table(title=title)
    if multi:
        table.add_column("input")
    for col in ("layer", "module", "ρ", "‖ΔW‖_F", decision):
        table.add_column(col, justify="right" if col in ("layer", "ρ", "‖ΔW‖_F") else "left")
    for s in scores:
        row = ["" if s.layer is None else str(s.layer), s.name, f"{s.rho:.5f}", f"{s.delta_norm:.4g}",
               "yes" if s.merged else "no"]
        table.add_row(*([s.source] if multi else []), *row)
    Console().print(table)


def _decided(scores: list, decision: str) -> str:
    return f"{sum(s.merged for s in scores)} of {len(scores)} layers {decision}"


def _evaluator(enabled: bool, aligned: str, sets: EvalSets) -> Callable[[Path], tuple[Any, str]] | None:
    """``--eval``: run :func:`safemerge.evaluate.api.evaluate` on the finished output (before renaming)."""
    if not enabled:
        return None

    def run(tmp: Path) -> tuple[Any, str]:
        from safemerge.evaluate.report import results_markdown

        # an adapter output is evaluated on the aligned model it belongs to, applied unmerged
        output_is_adapter = (tmp / "adapter_config.json").exists()
        model, adapter = (aligned, str(tmp)) if output_is_adapter else (str(tmp), None)
        res = sets.evaluate(model, tmp / "eval", adapter=adapter)
        return res, results_markdown(res)

    return run


@app.command("scan")
def scan_command(
    inputs: list[str] = typer.Argument(...,
                                       help="Fine-tuned LoRA adapters, full fine-tuned models or MODEL+ADAPTER (paths "
                                            "or Hub ids)."),
    base: str = typer.Option(..., "--base", help=_BASE_HELP),
    aligned: str = typer.Option(..., "--aligned", help=_ALIGNED_HELP),
    tau: float = typer.Option(SAFEMERGE_TAU.default, "--tau",
                              help="Threshold τ ∈ [-1, 1]; layers with ρ < τ are marked as merged (SafeMERGE)."),
    targets: str = typer.Option(None, "--targets",
                                help="Comma-separated module names to score (e.g. q_proj,v_proj). Default: all adapted "
                                     "modules / all block weights."),
    json_out: Path = typer.Option(None, "--json", help="Write the per-layer records as a JSON list."),
    csv_out: Path = typer.Option(None, "--csv", help="Write the per-layer records as CSV."),
    plot: Path = typer.Option(None, "--plot",
                              help="Write a heatmap PNG (layers × modules, coloured by ρ, cells below τ marked)."),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    quiet: bool = quiet_option(),
    no_progress: bool = no_progress_option(),
) -> None:
    """Per-layer safety similarity ρ = cos(CΔW, ΔW), C = VVᵀ/‖V‖_F (SafeLoRA/SafeMERGE), without forming C.

    Example: safemerge scan --base base/ --aligned chat/ task-lora/ --json rho.json --plot rho.png
    """
    import time

    from safemerge.errors import SafemergeError
    from safemerge.io.output import check_output_file
    from safemerge.progress import library_progress
    from safemerge.safety.api import scan
    from safemerge.safety.report import write_csv, write_json_records

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, allow_pickle=allow_pickle,
                          allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=False)
    tm = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    for p in (json_out, csv_out, plot):
        if p is not None and p.parent and not p.parent.exists():
            raise SafemergeError(f"directory {str(p.parent)!r} does not exist",
                                 "create it or choose another output path")
        if p is not None:
            check_output_file(p, force=True, inputs=(base, aligned, *inputs))  # scan reports are overwritten
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise SafemergeError(f"--plot {str(plot)!r}: unsupported image type {plot.suffix or '(none)'!r}",
                             f"end the file name in one of {', '.join(PLOT_SUFFIXES)}")
    with progress_callback(options.progress) as cb:
        scores = scan(base, aligned, inputs, tau=tau, target_modules=tm, options=options, progress=cb)
    if not quiet:
        _print_scores(scores, tau, "merged")
    if json_out is not None:
        write_json_records(json_out, scores)
    if csv_out is not None:
        write_csv(csv_out, scores)
    if plot is not None:
        from safemerge.safety.plots import heatmap

        heatmap(scores, plot, tau=tau)
    written = [p for p in (json_out, csv_out, plot) if p is not None]
    if written:
        echo_summary(written, started, detail=_decided(scores, "below τ"))
    else:
        typer.echo(f"scanned {len(inputs)} input(s) in {time.perf_counter() - started:.1f} s; "
                   f"{_decided(scores, 'below τ')}", err=True)


@app.command("safemerge")
def safemerge_command(
    finetuned: str = typer.Option(..., "--finetuned",
                                  help="Task LoRA adapter (or full fine-tuned model, or MODEL+ADAPTER) trained on "
                                       "--aligned."),
    safety: str = typer.Option(..., "--safety",
                               help="Safety LoRA adapter (or full model, or MODEL+ADAPTER) trained on --aligned."),
    base: str = typer.Option(..., "--base", help=_BASE_HELP),
    aligned: str = typer.Option(..., "--aligned", help=_ALIGNED_HELP),
    out: Path = typer.Option(..., "-o", "--out",
                             help="Output directory (a PEFT adapter, or a full model with --merge-into)."),
    tau: str = typer.Option(
        str(SAFEMERGE_TAU.default), "--tau",
        help="Merge layers with ρ < τ (τ ∈ [-1, 1]; the reference code's default), or 'auto' (needs "
             "--val-harmful/--val-utility)."),
    alpha: str = typer.Option(str(SAFEMERGE_ALPHA.default), "--alpha",
                              help="Weight α of the task update in α ΔW_f + (1−α) ΔW_s (α ∈ [0, 1]), or 'auto'."),
    val_harmful: str = typer.Option(None, "--val-harmful",
                                    help="Validation harmful prompts for --tau/--alpha auto (disjoint from your test "
                                         "set)."),
    val_utility: str = typer.Option(None, "--val-utility",
                                    help="Validation utility set for --tau/--alpha auto (e.g. a held-out GSM8K "
                                         "slice)."),
    harm_margin: float = typer.Option(
        DEFAULT_HARM_MARGIN, "--harm-margin",
        help="auto: allowed harmful-rate excess over the aligned model (fraction; 0.03 = 3 points)."),
    val_benign: str = typer.Option(None, "--val-benign", help="auto: benign look-alike validation prompts; the rule "
                                   "then also keeps over-refusal within --refusal-margin of the aligned model's."),
    refusal_margin: float = typer.Option(
        DEFAULT_REFUSAL_MARGIN, "--refusal-margin",
        help="auto with --val-benign: allowed over-refusal excess over the aligned model (fraction)."),
    safety_gain: float = typer.Option(
        SAFEMERGE_SAFETY_GAIN.default, "--safety-gain",
        help="g: merged layers get α ΔW_f + g(1−α) ΔW_s (g ≥ 0; 1 = the paper's convex weights)."),
    min_layer: int = typer.Option(
        SAFEMERGE_MIN_LAYER.default, "--min-layer",
        help="Merge only layers of blocks ≥ this index (0 = every block, the paper); e.g. the last 5 of 30: 25."),
    paper_rule_only: bool = typer.Option(
        False, "--paper-rule-only",
        help="With --tau auto: search only the paper's rule, not the late-block extension "
             "(--min-layer, --safety-gain)."),
    strategy: str = typer.Option("linear", "--strategy",
                                 help="linear (exact LoRA of rank r_f + r_s) | dare_linear | ties | dare_ties (dense "
                                      "per layer)."),
    compat: str = typer.Option(None, "--compat",
                               help="'reference': reproduce PEFT 0.14 factor-wise mixing of the released SafeMERGE "
                                    "code (cross terms included; equal ranks)."),
    merge_into: str = typer.Option(None, "--merge-into",
                                   help="Write a full model: this model (normally --aligned) plus the merged update."),
    density: float = typer.Option(SAFEMERGE_DENSITY.default, "--density",
                                  help="Keep fraction for dare_linear/ties/dare_ties."),
    seed: int = typer.Option(0, "--seed",
                             help="Seed for DARE (per-tensor generators, as in safemerge merge; outputs byte-identical "
                                  "per seed)."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    quiet: bool = quiet_option(),
    no_progress: bool = no_progress_option(),
    eval_: bool = eval_flag_option("Evaluate the output and put the safety report into its model card."),
    eval_harmful: str = eval_harmful_option(),
    eval_benign: str = eval_benign_option(),
    eval_utility: str = eval_utility_option(),
    eval_judge: str = eval_judge_option(),
    eval_limit: int = eval_limit_option(),
    eval_lm_eval_tasks: str = lm_eval_tasks_option("--eval-lm-eval-tasks"),
    eval_lm_eval_include: Path = lm_eval_include_option("--eval-lm-eval-include"),
) -> None:
    """SafeMERGE: layers whose update drifts from the safety subspace (ρ < τ) become α ΔW_f + (1−α) ΔW_s.

    Example: safemerge safemerge --base base/ --aligned chat/ --finetuned task-lora/ --safety safety-lora/ -o merged/
    """
    import time

    from safemerge.cli.tau_alpha import resolve_tau_alpha
    from safemerge.evaluate.records import PromptSets
    from safemerge.io.output import check_output_path
    from safemerge.progress import library_progress
    from safemerge.safety.api import safemerge_adapters
    from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings
    from safemerge.tuning.report import print_pareto

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, seed=seed, dtype=dtype, force=force,
                          allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=eval_ or "auto" in (tau, alpha))
    # fail before a (possibly long) automatic τ/α search
    check_output_path(out, force=options.force, inputs=(base, aligned, finetuned, safety, merge_into))
    models = SafeMergeModels(base, aligned, finetuned, safety)
    tau, alpha, tuned = resolve_tau_alpha(
        tau, alpha, models, PromptSets(val_harmful, val_benign, val_utility),
        search=SearchSettings(harm_margin=harm_margin, refusal_margin=refusal_margin, extensions=not paper_rule_only),
        log=lambda m: typer.echo(m, err=True))
    if tuned is not None:
        print_pareto(tuned)
        safety_gain, min_layer = tuned.chosen.safety_gain, tuned.chosen.min_layer  # the chosen rule
    sets = EvalSets(eval_harmful, eval_benign, eval_utility, eval_judge, eval_limit,
                    options=run_options(no_progress=not options.progress), lm_eval_tasks=eval_lm_eval_tasks,
                    lm_eval_include=eval_lm_eval_include)
    ev = _evaluator(eval_, aligned, sets)
    settings = SafeMergeSettings(tau=tau, alpha=alpha, strategy=strategy, compat=compat, density=density,
                                 safety_gain=safety_gain, min_layer=min_layer)
    with progress_callback(options.progress) as cb:
        res = safemerge_adapters(models, out, settings=settings, merge_into=merge_into, options=options, evaluate=ev,
                                 progress=cb)
    if not quiet:
        _print_scores(res.scores, res.tau, "merged")
    if res.reconstruction_error:
        worst = max(res.reconstruction_error.items(), key=lambda kv: kv[1])
        typer.echo(f"truncated SVD: max relative reconstruction error {worst[1]:.3e} ({worst[0]})", err=True)
    if tuned is not None:
        import shutil

        for name in ("autotune.json", "autotune.png", "tau_sweep.png"):
            shutil.copy2(tuned.work_dir / name, res.out / name)
        typer.echo(f"automatic τ/α: Pareto front plot {res.out / 'autotune.png'}", err=True)
    echo_summary(res.out, started, detail=f"{res.output}; {_decided(res.scores, 'merged')}")


@app.command("safelora")
def safelora_command(
    finetuned: str = typer.Option(..., "--finetuned",
                                  help="Task LoRA adapter (or full fine-tuned model, or MODEL+ADAPTER) trained on "
                                       "--aligned."),
    base: str = typer.Option(..., "--base", help=_BASE_HELP),
    aligned: str = typer.Option(..., "--aligned", help=_ALIGNED_HELP),
    out: Path = typer.Option(..., "-o", "--out",
                             help="Output directory (a PEFT adapter, or a full model with --merge-into)."),
    mode: str = typer.Option("threshold", "--mode",
                             help="threshold: project layers with ρ ≤ τ; number: project the K lowest-ρ layers."),
    tau: float = typer.Option(SAFELORA_TAU.default, "--tau", help="Threshold for --mode threshold (τ ∈ [-1, 1])."),
    num_layers: int = typer.Option(SAFELORA_NUM_LAYERS.default, "--num-layers", "-k", help="K for --mode number."),
    merge_into: str = typer.Option(None, "--merge-into",
                                   help="Write a full model: this model (normally --aligned) plus the projected "
                                        "update."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    quiet: bool = quiet_option(),
    no_progress: bool = no_progress_option(),
) -> None:
    """SafeLoRA: replace B by C·B = V(VᵀB)/‖V‖_F on low-similarity layers (Hsu et al. 2024).

    Example: safemerge safelora --base base/ --aligned chat/ --finetuned task-lora/ --mode number -k 10 -o safe-lora/
    """
    import time

    from safemerge.progress import library_progress
    from safemerge.safety.api import safelora

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, dtype=dtype, force=force, allow_pickle=allow_pickle,
                          allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=False)
    with progress_callback(options.progress) as cb:
        res = safelora(base=base, aligned=aligned, finetuned=finetuned, out=out, mode=mode, tau=tau,
                       num_layers=num_layers, merge_into=merge_into, options=options, progress=cb)
    if not quiet:
        _print_scores(res.scores, res.tau, "projected")
    echo_summary(res.out, started, detail=f"{res.output}; {_decided(res.scores, 'projected')}")


@app.command("resta")
def resta_command(
    finetuned: str = typer.Option(..., "--finetuned",
                                  help="Fine-tuned model, LoRA adapter (applied to --aligned) or MODEL+ADAPTER."),
    aligned: str = typer.Option(..., "--aligned", help="Safety-aligned model."),
    unaligned: str = typer.Option(..., "--unaligned", "--base",
                                  help="Unaligned model (base, or the aligned model fine-tuned on harmful data)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory."),
    beta: float = typer.Option(RESTA_BETA.default, "--beta",
                               help="Scale β of the safety vector θ_aligned − θ_unaligned."),
    dare_density: float = typer.Option(None, "--dare-density",
                                       help="Apply DARE with this keep fraction ∈ (0, 1] to θ_ft − θ_aligned first."),
    seed: int = typer.Option(0, "--seed", help="Seed for DARE (per-tensor generators)."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """RESTA: θ = θ_ft + β (θ_aligned − θ_unaligned), optionally with DARE on the fine-tuning delta (Bhardwaj et al.
    2024).

    Example: safemerge resta --unaligned base/ --aligned chat/ --finetuned task-lora/ --beta 0.5 -o resta/
    """
    import time

    from safemerge.progress import library_progress
    from safemerge.safety.api import resta

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, seed=seed, dtype=dtype, force=force,
                          allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=False)
    with progress_callback(options.progress) as cb:
        path = resta(unaligned=unaligned, aligned=aligned, finetuned=finetuned, out=out, beta=beta,
                     dare_density=dare_density, options=options, progress=cb)
    echo_summary(path, started)


@app.command("mergealign")
def mergealign_command(
    pretrained: str = typer.Option(..., "--pretrained", "--base", help="Pre-trained model both others derive from."),
    domain: str = typer.Option(..., "--domain", help="Domain expert model (or adapter applied to --pretrained)."),
    aligned: str = typer.Option(..., "--aligned", help="General instruct / preference-aligned model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory."),
    lambda_domain: float = typer.Option(MERGEALIGN_LAMBDA_DOMAIN.default, "--lambda-domain",
                                        help="λ_D, weight of θ_domain − θ_pre."),
    lambda_aligned: float = typer.Option(MERGEALIGN_LAMBDA_ALIGNED.default, "--lambda-aligned",
                                         help="λ_A, weight of θ_aligned − θ_pre."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    allow_nonfinite: bool = allow_nonfinite_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """MergeAlign: θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre) (arXiv 2411.06824).

    Example: safemerge mergealign --pretrained base/ --domain med/ --aligned chat/ -o merged/
    """
    import time

    from safemerge.progress import library_progress
    from safemerge.safety.api import mergealign

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, dtype=dtype, force=force, allow_pickle=allow_pickle,
                          allow_nonfinite=allow_nonfinite)
    library_progress(options.progress, loads_models=False)
    with progress_callback(options.progress) as cb:
        path = mergealign(pretrained=pretrained, domain=domain, aligned=aligned, out=out, lambda_domain=lambda_domain,
                          lambda_aligned=lambda_aligned, options=options, progress=cb)
    echo_summary(path, started)
