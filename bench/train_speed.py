"""Benchmark: a train-lora step with the LM head on the answer positions only vs on every position (issue 13).

SmolLM2-135M-Instruct, the demo's two LoRA recipes on their kind of data: the aligned SFT's shape (r=16 on all
linear layers, batch 8, max length 128) on the project's safety corpus, and the task LoRA's (r=8 on q_proj/v_proj)
on the arithmetic training problems. For each, the same seeded batches go through forward + backward twice per
round — ``model(**batch).loss`` (transformers: logits of every position) and
:func:`safemerge.train.loss.answer_token_loss` — in alternating order, ``--rounds`` rounds. Reported per recipe:
median seconds per step of each, their ratio, the largest loss difference and the share of answer positions.
The dtype is the one ``train-lora`` uses here (bf16 autocast where the CPU has it natively, else float32).

    .venv/bin/python bench/train_speed.py [--steps 6] [--rounds 3] [--threads 2]

Writes ``bench/results/train_speed.json``. Not a test: the figures are only as steady as the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _step_seconds(model, batches, loss_fn, dtype) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds per forward + backward over ``batches`` and the losses (the model's weights are not updated)."""
    import torch

    losses = []
    t0 = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return (time.perf_counter() - t0) / len(batches), losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "safemerge-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.data.safety_corpus import safety_lora_records
    from safemerge.demo.data import arithmetic_splits
    from safemerge.demo.zoo import ALIGN_RECIPE, TASK_RECIPE
    from safemerge.evaluate.generate import cpu_bf16_feature, resolve_dtype
    from safemerge.io.gguf import smollm2_float32
    from safemerge.train.loss import answer_token_loss
    from safemerge.train.tokenize import IGNORE_INDEX, collate, encode_chat_example

    torch.set_num_threads(args.threads)
    model_dir = smollm2_float32(args.cache / "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    dtype = resolve_dtype("auto", "cpu")
    data = {"aligned SFT shape (r=16, all-linear) on the safety corpus": (ALIGN_RECIPE, safety_lora_records()),
            "task LoRA shape (r=8, q_proj/v_proj) on arithmetic": (
                TASK_RECIPE, arithmetic_splits().train)}

    def full_logits(model, batch):  # noqa: ANN001, ANN202
        return model(**batch).loss

    results = {}
    for name, (recipe, rows) in data.items():
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
        torch.manual_seed(0)
        model = get_peft_model(lm, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                              target_modules=recipe.targets if isinstance(recipe.targets, str)
                                              else list(recipe.targets)))
        model.train()
        examples = [encode_chat_example(tok, r["prompt"], r["response"], max_length=recipe.max_length) for r in rows]
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(examples), generator=g).tolist()
        batches = [collate([examples[i] for i in order[s * recipe.batch_size:(s + 1) * recipe.batch_size]],
                           tok.pad_token_id) for s in range(args.steps)]
        answer = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        positions = sum(int(b["attention_mask"][:, 1:].sum()) for b in batches)
        times: dict[str, list[float]] = {"full_logits": [], "answer_positions": []}
        diffs = []
        for rnd in range(args.rounds):
            variants = [("full_logits", full_logits), ("answer_positions", answer_token_loss)]
            got = {}
            for key, fn in variants if rnd % 2 == 0 else variants[::-1]:
                seconds, losses = _step_seconds(model, batches, fn, dtype)
                times[key].append(seconds)
                got[key] = losses
            diffs.append(max(abs(a - b) for a, b in zip(got["full_logits"], got["answer_positions"])))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"seconds_per_step": {k: round(v, 3) for k, v in med.items()},
                         "all_seconds_per_step": {k: [round(x, 3) for x in v] for k, v in times.items()},
                         "ratio_answer_over_full": round(med["answer_positions"] / med["full_logits"], 3),
                         "max_abs_loss_diff": max(diffs), "answer_share_of_positions": round(answer / positions, 3),
                         "batch_size": recipe.batch_size, "steps": args.steps}
        print(f"{name}: full {med['full_logits']:.3f} s/step, answer positions {med['answer_positions']:.3f} s/step "
              f"({results[name]['ratio_answer_over_full']}×), max |Δloss| {max(diffs):.2e}, "
              f"answer share {answer / positions:.2f}", flush=True)
    res = {"model": "SmolLM2-135M-Instruct", "dtype": dtype, "threads": args.threads,
           "cpu_bf16_feature": cpu_bf16_feature(), "load_average": os.getloadavg(), "recipes": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
