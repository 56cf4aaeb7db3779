"""``extract-lora`` (a full fine-tune → PEFT LoRA adapter) and ``repair`` (one command from a fine-tune to a repaired one).

Thin wrappers over :mod:`safemerge.extract` and :mod:`safemerge.repair`; torch is imported inside the command bodies.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from safemerge.cli import app
from safemerge.cli.options import allow_pickle_option, dtype_option, force_option, no_progress_option


@app.command("extract-lora")
def extract_lora_command(
    finetuned: Path = typer.Argument(..., help="Fully fine-tuned model directory."),
    base: Path = typer.Option(..., "--base", help="The model FINETUNED was fine-tuned from (the adapter's base)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output PEFT adapter directory."),
    max_rank: int = typer.Option(128, "--max-rank", "--rank", help="Rank cap per module (mergekit's --max-rank; --rank is the older name)."),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Discard singular values ≤ this (0: keep --max-rank)."),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora", help="Extract embeddings and lm_head as LoRA instead of saving them at full rank (modules_to_save)."),
    save_modules: list[str] = typer.Option([], "--save-module", help="Save this module at full rank (modules_to_save); repeatable."),
    dtype: str = dtype_option(),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    no_progress: bool = no_progress_option(),
) -> None:
    """Extract a LoRA adapter from a full fine-tune: per-module truncated SVD of W_ft − W_base (mergekit-extract-lora parity).

    Example: safemerge extract-lora finetuned/ --base chat/ --max-rank 32 -o task-lora/
    """
    from safemerge.cli.safety_cmd import _progress
    from safemerge.extract import extract_lora

    started = time.perf_counter()
    with _progress(not no_progress) as cb:
        res = extract_lora(finetuned, base, out, max_rank=max_rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora,
                           save_modules=save_modules, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=cb)
    saved = sum(m.kind == "modules_to_save" for m in res.modules)
    typer.echo(f"extracted {len(res.lora)} LoRA modules (max relative error {res.max_relative_error:.3e}), "
               f"{saved} tensors at full rank; wrote {res.out} in {time.perf_counter() - started:.1f} s", err=True)


@app.command("repair")
def repair_command(
    finetuned: Path = typer.Argument(..., help="Task LoRA adapter trained on --aligned, or a full fine-tune of --aligned (extracted to a LoRA first)."),
    base: Path = typer.Option(..., "--base", help="Unaligned base model (with --aligned: the safety subspace V = W_aligned − W_base)."),
    aligned: Path = typer.Option(..., "--aligned", help="Safety-aligned model the fine-tune started from."),
    out: Path = typer.Option(..., "-o", "--out", help="Output: the repaired PEFT adapter (or a full model with --merge-into)."),
    utility: str = typer.Option(..., "--utility", help="Your utility validation set (JSONL with prompt/answer, or builtin:arithmetic) for tuning τ/α."),
    safety: Path = typer.Option(None, "--safety", help="An existing safety LoRA on --aligned; default: train one with the task adapter's rank and targets."),
    safety_data: Path = typer.Option(None, "--safety-data", help="Safety SFT data (JSONL prompt/response refusals) for the safety LoRA; default: the built-in set."),
    safety_steps: int = typer.Option(None, "--safety-steps", help="Training steps of the safety LoRA (default: the built-in recipe's)."),
    safety_lr: float = typer.Option(None, "--safety-lr", help="Learning rate of the safety LoRA (default: the built-in recipe's)."),
    val_harmful: str = typer.Option(None, "--val-harmful", help="Harmful validation prompts for tuning (default: built-in held-out requests)."),
    test_harmful: str = typer.Option("builtin:harmful", "--test-harmful", help="Harmful test prompts for the before/after table."),
    test_benign: str = typer.Option("builtin:benign", "--test-benign", help="Benign look-alike test prompts (over-refusal)."),
    test_utility: str = typer.Option(None, "--test-utility", help="Utility test set (default: the --utility set, labelled as validation)."),
    merge_into: Path = typer.Option(None, "--merge-into", help="Write a full model: this model (normally --aligned) plus the repaired update."),
    extract_rank: int = typer.Option(64, "--extract-rank", help="Max rank of the LoRA extracted from a full fine-tune."),
    harm_margin: float = typer.Option(0.02, "--harm-margin", help="Allowed validation harmful-rate excess over the aligned model (0.02 = 2 points)."),
    judge: str = typer.Option("keyword", "--judge", help="Harmfulness judge (keyword, llamaguard:PATH, …)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Generation budget per answer (default: the harness's)."),
    work_dir: Path = typer.Option(None, "--work-dir", help="Cache for extraction, safety LoRA, grid and generations (default: under $SAFEMERGE_CACHE)."),
    force: bool = force_option(),
    allow_pickle: bool = allow_pickle_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the before/after table."),
    no_progress: bool = no_progress_option(),
) -> None:
    """Repair a fine-tune's safety in one command: safety LoRA, ρ scan, τ/α tuned on validation, SafeMERGE, before/after report.

    Example: safemerge repair task-lora/ --base base/ --aligned chat/ --utility val.jsonl --test-utility test.jsonl -o repaired/
    """
    from dataclasses import replace

    from safemerge.repair.pipeline import print_report, repair
    from safemerge.repair.safety_lora import DEFAULT_RECIPE

    overrides = {k: v for k, v in (("steps", safety_steps), ("lr", safety_lr)) if v is not None}
    started = time.perf_counter()
    res = repair(finetuned, base=base, aligned=aligned, out=out, utility=utility, safety=safety, safety_data=safety_data,
                 val_harmful=val_harmful, test_harmful=test_harmful, test_benign=test_benign, test_utility=test_utility,
                 merge_into=merge_into, extract_rank=extract_rank, recipe=replace(DEFAULT_RECIPE, **overrides),
                 harm_margin=harm_margin, judge=judge,
                 max_new_tokens=None if max_new_tokens is None else dict.fromkeys(("harmful", "benign", "utility"), max_new_tokens),
                 work_dir=work_dir, force=force, allow_pickle=allow_pickle, log=lambda m: typer.echo(m, err=True),
                 progress=not no_progress)
    if not quiet:
        print_report(res)
    typer.echo(f"wrote repaired {res.output} to {res.out} ({len(res.autotune.chosen.merged)} layers merged) "
               f"in {time.perf_counter() - started:.1f} s", err=True)
