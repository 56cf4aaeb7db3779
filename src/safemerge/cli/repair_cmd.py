"""``extract-lora`` (a full fine-tune → PEFT LoRA adapter) and ``repair`` (a fine-tune → a safety-repaired one).

Thin wrappers over :mod:`safemerge.extract` and :mod:`safemerge.repair`; torch is imported inside the
command bodies.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    allow_pickle_option,
    dtype_option,
    echo_summary,
    force_option,
    no_progress_option,
    quiet_option,
    run_options,
)
from safemerge.tuning.grid import DEFAULT_HARM_MARGIN, DEFAULT_REFUSAL_MARGIN, SearchSettings

_RANK_HELP = "Rank cap per module (mergekit's --max-rank; --rank is the older name)."
_EMBED_HELP = "Extract embeddings and lm_head as LoRA instead of saving them at full rank (modules_to_save)."
_FT_HELP = "Task LoRA adapter trained on --aligned, or a full fine-tune of --aligned (extracted to a LoRA first)."
_UTILITY_HELP = "Your utility validation set (JSONL prompt/answer, or builtin:arithmetic), used to tune τ/α."
_SAFETY_HELP = "An existing safety LoRA on --aligned; default: train one with the task adapter's rank and targets."
_SAFETY_DATA_HELP = "Safety SFT data (JSONL prompt/response refusals) for the safety LoRA; default: the built-in set."
_PAPER_RULE_HELP = ("Search only the paper's rule (ρ < τ, convex weights), not the late-block extension "
                    "(min layer, safety gain).")
_WORK_HELP = "Cache for extraction, safety LoRA, grid and generations (default: under $SAFEMERGE_CACHE/repair)."


@app.command("extract-lora")
def extract_lora_command(
    finetuned: Path = typer.Argument(..., help="Fully fine-tuned model directory."),
    base: Path = typer.Option(..., "--base", help="The model FINETUNED was fine-tuned from (the adapter's base)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output PEFT adapter directory."),
    max_rank: int = typer.Option(128, "--max-rank", "--rank", help=_RANK_HELP),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Discard singular values ≤ this (0: keep --max-rank)."),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora", help=_EMBED_HELP),
    save_modules: list[str] = typer.Option([], "--save-module", help="Save this module at full rank; repeatable."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    quiet: bool = quiet_option(),
    no_progress: bool = no_progress_option(),
) -> None:
    """Extract a LoRA adapter from a full fine-tune: truncated SVD of W_ft − W_base per module (mergekit parity).

    Example: safemerge extract-lora finetuned/ --base chat/ --max-rank 32 -o task-lora/
    """
    from safemerge.cli.safety_cmd import progress_callback
    from safemerge.extract import extract_lora
    from safemerge.progress import library_progress

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, dtype=dtype, force=force, allow_pickle=allow_pickle)
    library_progress(options.progress)
    with progress_callback(options.progress) as cb:
        res = extract_lora(finetuned, base, out, max_rank=max_rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora,
                           save_modules=save_modules, options=options, progress=cb)
    saved = sum(m.kind == "modules_to_save" for m in res.modules)
    echo_summary(res.out, started, detail=f"{len(res.lora)} LoRA modules (max relative error "
                 f"{res.max_relative_error:.3e}), {saved} tensors at full rank")


@app.command("repair")
def repair_command(
    finetuned: Path = typer.Argument(..., help=_FT_HELP),
    base: Path = typer.Option(..., "--base", help="Unaligned base model (with --aligned: V = W_aligned − W_base)."),
    aligned: Path = typer.Option(..., "--aligned", help="Safety-aligned model the fine-tune started from."),
    out: Path = typer.Option(..., "-o", "--out", help="The repaired PEFT adapter (a full model with --merge-into)."),
    utility: str = typer.Option(..., "--utility", help=_UTILITY_HELP),
    safety: Path = typer.Option(None, "--safety", help=_SAFETY_HELP),
    safety_data: Path = typer.Option(None, "--safety-data", help=_SAFETY_DATA_HELP),
    safety_steps: int = typer.Option(None, "--safety-steps", help="Safety LoRA training steps (default: recipe's)."),
    safety_lr: float = typer.Option(None, "--safety-lr", help="Safety LoRA learning rate (default: recipe's)."),
    val_harmful: str = typer.Option(None, "--val-harmful", help="Harmful validation prompts (default: built-in)."),
    val_benign: str = typer.Option(None, "--val-benign",
                                   help="Benign look-alike validation prompts (default: built-in)."),
    test_harmful: str = typer.Option("builtin:harmful", "--test-harmful", help="Harmful test prompts."),
    test_benign: str = typer.Option("builtin:benign", "--test-benign", help="Benign look-alikes (over-refusal)."),
    test_utility: str = typer.Option(None, "--test-utility", help="Utility test set (default: --utility, labelled)."),
    merge_into: Path = typer.Option(None, "--merge-into", help="Write a full model: this model + the repaired update."),
    extract_rank: int = typer.Option(64, "--extract-rank", help="Max rank of the LoRA extracted from a full model."),
    harm_margin: float = typer.Option(DEFAULT_HARM_MARGIN, "--harm-margin",
                                      help="Allowed validation harmful-rate excess over the aligned model (fraction)."),
    refusal_margin: float = typer.Option(DEFAULT_REFUSAL_MARGIN, "--refusal-margin",
                                         help="Allowed validation over-refusal excess over the aligned model "
                                              "(fraction)."),
    judge: str = typer.Option("keyword", "--judge", help="Harmfulness judge (keyword, llamaguard:PATH, …)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Tokens per answer (default: harness's)."),
    work_dir: Path = typer.Option(None, "--work-dir", help=_WORK_HELP),
    paper_rule_only: bool = typer.Option(False, "--paper-rule-only", help=_PAPER_RULE_HELP),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    quiet: bool = quiet_option(),
    no_progress: bool = no_progress_option(),
) -> None:
    """Repair a fine-tune's safety: safety LoRA, ρ scan, τ/α tuned on validation, SafeMERGE, before/after table.

    Example: safemerge repair task-lora/ --base base/ --aligned chat/ --utility val.jsonl --test-utility test.jsonl
    -o repaired/
    """
    from safemerge.evaluate.records import PromptSets
    from safemerge.evaluate.suites import SuiteSettings
    from safemerge.progress import library_progress
    from safemerge.repair.pipeline import RepairModels, RepairRecipe, print_report, repair

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, force=force, allow_pickle=allow_pickle)
    library_progress(options.progress)
    budget = None if max_new_tokens is None else dict.fromkeys(("harmful", "benign", "utility"), max_new_tokens)
    res = repair(RepairModels(finetuned, base, aligned, safety=safety, merge_into=merge_into), out,
                 validation=PromptSets(val_harmful, val_benign, utility),
                 test=PromptSets(test_harmful, test_benign, test_utility),
                 recipe=RepairRecipe(extract_rank, safety_data, safety_steps, safety_lr),
                 search=SearchSettings(harm_margin=harm_margin, refusal_margin=refusal_margin,
                                       extensions=not paper_rule_only),
                 settings=SuiteSettings(judge=judge, max_new_tokens=budget),
                 work_dir=work_dir, options=options, log=None if quiet else (lambda m: typer.echo(m, err=True)))
    if not quiet:
        print_report(res)
    echo_summary(res.out, started, detail=f"repaired {res.output}, {res.autotune.describe()}, "
                 f"{len(res.autotune.chosen.merged)} layers merged")
