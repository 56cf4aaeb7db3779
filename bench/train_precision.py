"""Benchmark: train-lora in float32 vs bf16 autocast on the demo's task recipe (issue 13).

SmolLM2-135M-Instruct, the demo's arithmetic training data and TASK_RECIPE (r=8 on q_proj/v_proj,
batch 8, lr 1e-3, max length 128), ``--steps`` steps. Three runs: float32 with the recipe's seed,
bfloat16 with the same seed, and float32 with another seed — the seed-to-seed difference is the
noise the bf16-vs-float32 difference is compared with (mean absolute difference of the per-step
losses, and of their last-10-step means). Also seconds per step of each run.

    .venv/bin/python bench/train_precision.py [--steps 30] [--threads 2]

Writes ``bench/results/train_precision.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mean_abs_diff(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "safemerge-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_precision.json")
    args = ap.parse_args(argv)

    import torch

    from safemerge.demo.data import arithmetic_splits
    from safemerge.demo.zoo import TASK_RECIPE as R
    from safemerge.evaluate.generate import cpu_bf16_feature
    from safemerge.io.gguf import smollm2_float32
    from safemerge.options import RunOptions
    from safemerge.train.lora import train_lora
    from safemerge.train.recipe import LoraShape, TrainingRecipe

    torch.set_num_threads(args.threads)
    model = smollm2_float32(args.cache / "smollm2-135m-instruct")
    records = arithmetic_splits().train
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        for name, precision, seed in (("float32", "float32", R.seed), ("bfloat16", "bfloat16", R.seed),
                                      ("float32-other-seed", "float32", R.seed + 100)):
            t0 = time.perf_counter()
            recipe = TrainingRecipe(steps=args.steps, batch_size=R.batch_size, lr=R.lr, max_length=R.max_length,
                                    precision=precision)
            out = train_lora(model, records, Path(tmp) / name, shape=LoraShape(rank=R.rank, alpha=R.alpha,
                                                                                targets=R.targets),
                             recipe=recipe, options=RunOptions(seed=seed, progress=False))
            seconds = time.perf_counter() - t0
            losses = json.loads((out / "training_log.json").read_text())["losses"]
            runs[name] = {"precision": precision, "seed": seed, "seconds": round(seconds, 1),
                          "seconds_per_step": round(seconds / args.steps, 3), "losses": [round(x, 4) for x in losses]}
            print(f"{name:20s} {seconds:7.1f} s  loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    ref, bf, other = (runs[k]["losses"] for k in ("float32", "bfloat16", "float32-other-seed"))
    tail = min(10, args.steps)
    res = {
        "model": "SmolLM2-135M-Instruct", "recipe": "demo TASK_RECIPE (arithmetic)", "steps": args.steps,
        "threads": args.threads, "cpu_bf16_feature": cpu_bf16_feature(), "runs": runs,
        "bf16_vs_float32_mean_abs_loss_diff": round(_mean_abs_diff(bf, ref), 4),
        "seed_noise_mean_abs_loss_diff": round(_mean_abs_diff(other, ref), 4),
        "last_steps_mean": {k: round(sum(v["losses"][-tail:]) / tail, 4) for k, v in runs.items()},
        "bf16_speedup": round(runs["float32"]["seconds"] / runs["bfloat16"]["seconds"], 2),
    }
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
