"""``safemerge safety-lora``: SafeMERGE's safety LoRA, shaped like the task LoRA, with a measured card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    eval_benign_option,
    eval_harmful_option,
    eval_limit_option,
    force_option,
    run_options,
)
from safemerge.train.safety_lora import (
    DISTILLED_PER_RECORD,
    SAFETY_BATCH,
    SAFETY_LR,
    SAFETY_RECIPE,
    SAFETY_STEPS,
)


@app.command(
    "safety-lora",
    help=(
        "Train SafeMERGE's safety LoRA on the ALIGNED model with the rank, alpha and target modules of the task "
        "LoRA given as --like, from the safety data shipped with safemerge (harmful requests with refusals and "
        "benign look-alikes with helpful answers) or --data FILE. Its model card reports the loss curve and the "
        "harmful rate / over-refusal of aligned + the safety LoRA alone. "
        "Example: safemerge safety-lora --aligned aligned/ --like task_lora/ -o safety_lora/"
    ),
    no_args_is_help=True,
)
def safety_lora_cmd(
    aligned: Path = typer.Option(
        ..., "--aligned", help="Aligned model directory (the task LoRA's base).", show_default=False
    ),
    like: Path = typer.Option(
        ..., "--like", help="Task LoRA adapter whose rank, alpha and targets are copied.", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter directory.", show_default=False),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        "-d",
        show_default=False,
        help="Safety training data (.jsonl/.json prompt/response records); " "default: the project's safety corpus.",
    ),
    steps: int = typer.Option(SAFETY_STEPS, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(SAFETY_LR, "--lr", help="Peak learning rate (linear warm-up 10%, then linear decay)."),
    batch_size: int = typer.Option(SAFETY_BATCH, "--batch-size", "-b", help="Examples per step."),
    seed: int = typer.Option(0, "--seed", help="Seed for the LoRA initialisation and the data order."),
    eval_harmful: str = eval_harmful_option(),
    eval_benign: str = eval_benign_option(),
    eval_limit: Optional[int] = eval_limit_option(),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the stand-alone evaluation in the model card."),
    distill: bool = typer.Option(
        True,
        "--distill/--no-distill",
        help="Mix in the aligned model's own helpful answers to the shipped benign look-alikes (refusals dropped), "
        "so the safety LoRA learns to refuse harm without refusing what the aligned model answers.",
    ),
    distilled_per_record: int = typer.Option(
        DISTILLED_PER_RECORD,
        "--distilled-per-record",
        min=1,
        help="At most this many self-distilled answers per safety record (a seeded sample), so that helpful "
        "answers do not outnumber the refusals.",
    ),
    unlikelihood: float = typer.Option(
        SAFETY_RECIPE.unlikelihood_weight,
        "--unlikelihood",
        min=0.0,
        help="Weight of an unlikelihood term that makes the opening words of a refusal unlikely after every benign "
        "look-alike prompt (the data's answered prompts and the shipped look-alikes), so the LoRA learns to refuse "
        "harm, not a phrasing; 0 turns it off.",
    ),
    precision: str = typer.Option(
        "float32", "--precision", help="Training precision: float32, bfloat16 (autocast) or auto (bf16 where native)."
    ),
    force: bool = force_option(),
) -> None:
    """Train the safety LoRA and print its loss and stand-alone evaluation."""
    from rich.console import Console

    from safemerge.evaluate.records import PromptSets
    from safemerge.train.safety_lora import train_safety_lora

    options = run_options(seed=seed, force=force)
    recipe = replace(SAFETY_RECIPE, steps=steps, lr=lr, batch_size=batch_size, precision=precision,
                     unlikelihood_weight=unlikelihood)
    res = train_safety_lora(aligned, like, out, data=data, recipe=recipe,
                            sets=PromptSets(harmful=eval_harmful, benign=eval_benign), evaluate=not no_eval,
                            limit=eval_limit, distill_benign=distill,
                            distilled_per_record=distilled_per_record, options=options)
    con = Console()
    con.print(
        f"safety LoRA r={res.rank} targets={res.targets}: {res.n_records['data']} safety records + "
        f"{res.n_records['distilled']} self-distilled answers"
        + (f" + {res.n_records['rejected']} refusal openings made unlikely" if res.n_records.get("rejected") else "")
        + f"; loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}; "
        f"wrote {out}"
    )
    for name, label in (("aligned", "aligned"), ("safety", "aligned + safety LoRA")):
        m = res.evaluation.get(name)
        if m:
            con.print(
                f"  {label:24s} harmful {100 * m['harmful_rate']:5.1f}%  "
                f"over-refusal {100 * m['over_refusal_rate']:5.1f}%"
            )
    if res.target_met is not None:
        con.print(f"  target (as safe as aligned, no more over-refusal): {'met' if res.target_met else 'not met'}")
