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
