"""``safemerge train-lora``: supervised LoRA fine-tuning (PEFT) on prompt/response data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    echo_summary,
    force_option,
    no_progress_option,
    quiet_option,
    run_options,
    trust_remote_code_option,
)


@app.command(
    "train-lora",
    help=(
        "Fine-tune MODEL with a LoRA on chat-formatted prompt/response data (prompt tokens masked "
        "out of the loss) and write a PEFT adapter, or with --merge a full model. DATA is JSONL or "
        "JSON with prompt/response, instruction/input/output, question/answer or messages records. "
        "Example: safemerge train-lora base/ --data safety.jsonl -o safety_lora/ --rank 8 --steps 80"
    ),
    no_args_is_help=True,
)
def train_lora_cmd(
    model: str = typer.Argument(...,
                                help="Model directory (with tokenizer and chat template), Hub id, or MODEL+ADAPTER "
                                     "(adapter merged in first).", show_default=False),
    data: Path = typer.Option(..., "--data", "-d", help="Training data: .jsonl or .json file.", show_default=False),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (adapter, or model with --merge).",
                             show_default=False),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank r."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scaling alpha/r)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", min=0.0, max=0.99,
                                       help="Dropout on the LoRA input while training (PEFT lora_dropout); seeded, so "
                                            "runs stay byte-identical."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Comma-separated module names, or all-linear."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch).",
                                        show_default=False),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs over the data (alternative to --steps).",
                                           show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Examples per step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (linear warm-up 10%, then linear decay)."),
    max_length: int = typer.Option(256, "--max-length", help="Maximum tokens per example."),
    seed: int = typer.Option(0, "--seed", help="Seed for the LoRA initialisation and the data order."),
    system: Optional[str] = typer.Option(None, "--system", help="System message added to every example.",
                                         show_default=False),
    merge: bool = typer.Option(False, "--merge", help="Write a full model with the LoRA merged into the weights."),
    precision: Optional[str] = typer.Option(
        None, "--precision", show_default=False,
        help="float32 (default) | bfloat16 (autocast) | auto (bfloat16 where the CPU supports it natively)."),
    force: bool = force_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Train a LoRA on DATA and write it to OUT."""
    import json
    import time

    from safemerge.progress import library_progress
    from safemerge.train.lora import TRAINING_LOG, train_lora
    from safemerge.train.recipe import LoraShape, TrainingRecipe

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, seed=seed, force=force,
                          trust_remote_code=trust_remote_code)
    library_progress(options.progress)
    shape = LoraShape(rank=rank, alpha=alpha, targets=targets)
    recipe = TrainingRecipe(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, max_length=max_length,
                            dropout=lora_dropout, precision=precision)
    train_lora(model, data, out, shape=shape, recipe=recipe, merge=merge, system=system, options=options)
    log = json.loads((out / TRAINING_LOG).read_text())
    losses = log["losses"]
    echo_summary(out, started,
                 detail=f"trained {len(losses)} steps on {log['records']} records, loss {losses[0]:.4f} → "
                        f"{losses[-1]:.4f}")
