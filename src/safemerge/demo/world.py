"""A tiny behavioural world: SafeMERGE's story on a model trained from scratch in seconds.

The world (language: :mod:`safemerge.demo.world_data`) builds the same four models as the
SmolLM2 zoo, on a 2-layer Llama with hidden size 64 and a word-level vocabulary:

1. ``base`` — trained from scratch (full parameters) to follow instructions and to *comply* with
   every request, harmful ones included;
2. ``aligned`` — ``base`` after a safety SFT of all parameters (harmful → refusal, benign
   look-alikes → the base model's own answers, i.e. self-distillation);
3. ``task`` — a q/v LoRA on ``aligned`` that learns a new skill ("last x y z" → "sure . z") from
   task data only — benign fine-tuning that erodes refusals as a side effect (Qi et al. 2023;
   SafeMERGE, Djuhera et al. 2025, §1);
4. ``safety`` — a LoRA with the same rank and targets, trained on ``aligned`` with refusals.

:func:`build_world` trains all four (skipping what exists) and returns :class:`~safemerge.demo.zoo.ZooPaths`
whose evaluation sets are held out from every training set. ``safemerge demo --fast`` and the CI
test run the full pipeline on it.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge.cache import fingerprint
from safemerge.demo.world_data import make_world_data, world_words
from safemerge.demo.zoo import Log, ZooPaths, cached_step, read_jsonl, write_jsonl
from safemerge.evaluate.generate import load_generator
from safemerge.io.output import atomic_output
from safemerge.options import RunOptions
from safemerge.testing import build_tokenizer, make_tiny_model, save_model
from safemerge.train.lora import train_lora
from safemerge.train.recipe import LoraShape, TrainingRecipe
from safemerge.train.tokenize import collate, encode_chat_example

WORLD_VERSION = 1

# SafeMERGE setting used by the CI test (tests/test_world_behaviour.py). In this world every task-LoRA
# layer has ρ between ~0.38 and ~0.49, so the reference τ = 0.35 merges nothing; τ = 0.5 merges all
# four q/v matrices. α = 0.7 was picked by inspecting the τ/α sweep of ``safemerge demo --fast``
# (docs/demo.md lists the measured grid); the test states the utility margin it allows.
WORLD_TAU = 0.5
WORLD_ALPHA = 0.7
WORLD_UTILITY_MARGIN = 0.05


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world (hashed into the cache directory names).

    The defaults were chosen so that, on this seed, fine-tuning visibly erodes refusals and the
    whole world trains in well under a minute on one CPU thread; see ``docs/demo.md``.
    """

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    align_steps: int = 150
    align_lr: float = 1e-3
    task_steps: int = 300
    task_lr: float = 3e-3
    safety_steps: int = 300
    safety_lr: float = 1e-2
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_batch: int = 32
    max_new_tokens: int = 16


def world_tokenizer():
    """The world's word-level tokenizer (ChatML template; every world word is one token)."""

    words = world_words()
    n = len(words) + 6 + 60  # specials + characters of build_tokenizer
    return build_tokenizer(vocab_size=((n + 7) // 8) * 8, words=words)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def full_sft(out: Path, records: list[dict[str, Any]], *, init: Path | None, steps: int, lr: float, batch: int,
             cfg: WorldConfig) -> Path:
    """Train every parameter on ``records`` (answer-token loss, AdamW, constant lr) and save atomically.

    ``init=None`` starts from a freshly initialised tiny Llama (the base model, trained from
    scratch); otherwise from the model in ``init`` (the aligned model's safety SFT). The loss is
    the masked answer-token cross-entropy of :func:`safemerge.train.tokenize.encode_chat_example`.
    """

    tok = world_tokenizer()
    _seed_all(cfg.seed)
    if init is None:
        model = make_tiny_model("llama", seed=cfg.seed, vocab_size=len(tok), hidden=cfg.hidden, layers=cfg.layers)
        with torch.no_grad():  # make_tiny_model draws every parameter from N(0, 0.05); norms start at 1 to train
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32, trust_remote_code=False)
    enc = [encode_chat_example(tok, r["prompt"], r["response"], max_length=64) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(enc), (batch,), generator=g).tolist()
        loss = model(**collate([enc[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with atomic_output(out) as tmp:
        save_model(model, tmp, tokenizer=tok)
    return out


def _lora(model: Path, records: list[dict[str, Any]], out: Path, cfg: WorldConfig, *, rank: int, targets: Any,
          steps: int, lr: float, seed: int, merge: bool) -> None:

    train_lora(model, records, out, shape=LoraShape(rank=rank, alpha=2 * rank, targets=targets),
               recipe=TrainingRecipe(steps=steps, batch_size=cfg.lora_batch, lr=lr, max_length=64), merge=merge,
               options=RunOptions(seed=seed, progress=False))


def _distill(model: Path, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    gen = load_generator(str(model), backend="hf", device="cpu")
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens + 8, progress=False)
    return [{"prompt": p, "response": o.strip()} for p, o in zip(prompts, outs) if o.strip()]


def build_world(root: str | Path, cfg: WorldConfig | None = None, *, log: Log | None = None) -> ZooPaths:
    """Train (or reuse) the world's base, aligned, task-LoRA and safety-LoRA models under ``root``.

    Deterministic: the same ``cfg`` gives byte-identical models (single-threaded CPU training is
    seeded throughout). Returns the paths plus held-out evaluation and validation sets.
    """

    cfg = cfg or WorldConfig()
    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    # each step's directory is named after everything it depends on, so changing a late setting reuses early steps
    k_base = fingerprint(WORLD_VERSION, cfg.seed, cfg.hidden, cfg.layers, cfg.pretrain_steps, cfg.pretrain_lr,
                         cfg.pretrain_batch)
    k_data = fingerprint(k_base, cfg.max_new_tokens)
    k_aligned = fingerprint(k_data, cfg.align_steps, cfg.align_lr, cfg.pretrain_batch)
    lora = (cfg.lora_rank, list(cfg.lora_targets), cfg.lora_batch)
    k_task = fingerprint(k_aligned, cfg.task_steps, cfg.task_lr, lora)
    k_safety = fingerprint(k_aligned, cfg.safety_steps, cfg.safety_lr, lora)
    d = make_world_data(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast for a model this small
    try:
        base = cached_step("world base (from scratch)", root / f"base-{k_base}",
                           lambda out: full_sft(out, d.pretrain, init=None, steps=cfg.pretrain_steps,
                                                lr=cfg.pretrain_lr, batch=cfg.pretrain_batch, cfg=cfg), say)
        data = root / f"data-{k_data}"

        def build_data(out: Path) -> None:
            benign = _distill(base, [r["prompt"] for r in d.benign_train], cfg.max_new_tokens)
            with atomic_output(out) as tmp:
                write_jsonl(tmp / "align_train.jsonl", d.harmful_train + benign + d.repeat_train)
                write_jsonl(tmp / "task_train.jsonl", d.task_train)
                write_jsonl(tmp / "safety_train.jsonl", d.harmful_train)
                write_jsonl(tmp / "eval_harmful.jsonl", d.harmful_test)
                write_jsonl(tmp / "eval_benign.jsonl", d.benign_test)
                write_jsonl(tmp / "eval_utility.jsonl", d.task_test)
                write_jsonl(tmp / "val_harmful.jsonl", d.harmful_val)
                write_jsonl(tmp / "val_utility.jsonl", d.task_val)

        cached_step("world data (self-distilled benign answers)", data, build_data, say)

        aligned = cached_step("world aligned (safety SFT, all parameters)", root / f"aligned-{k_aligned}",
                              lambda out: full_sft(out, read_jsonl(data / "align_train.jsonl"), init=base,
                                                   steps=cfg.align_steps,
                                                   lr=cfg.align_lr, batch=cfg.pretrain_batch, cfg=cfg), say)
        task = cached_step("world task LoRA", root / f"task-{k_task}",
                           lambda out: _lora(aligned, read_jsonl(data / "task_train.jsonl"), out, cfg,
                                             rank=cfg.lora_rank,
                                             targets=list(cfg.lora_targets), steps=cfg.task_steps, lr=cfg.task_lr,
                                             seed=cfg.seed + 1, merge=False), say)
        safety = cached_step("world safety LoRA", root / f"safety-{k_safety}",
                             lambda out: _lora(aligned, read_jsonl(data / "safety_train.jsonl"), out, cfg,
                                               rank=cfg.lora_rank,
                                               targets=list(cfg.lora_targets), steps=cfg.safety_steps, lr=cfg.safety_lr,
                                               seed=cfg.seed + 2, merge=False), say)
    finally:
        torch.set_num_threads(threads)
    mnt = cfg.max_new_tokens
    return ZooPaths(
        base=base, aligned=aligned, task=task, safety=safety, data=data,
        eval_sets={"harmful": str(data / "eval_harmful.jsonl"), "benign": str(data / "eval_benign.jsonl"),
                   "utility": str(data / "eval_utility.jsonl")},
        val_sets={"harmful": str(data / "val_harmful.jsonl"), "utility": str(data / "val_utility.jsonl")},
        max_new_tokens={"harmful": mnt, "benign": mnt, "utility": mnt},
        info={"model": f"tiny world Llama (hidden {cfg.hidden}, {cfg.layers} layers), trained from scratch",
              "data": "synthetic instruction language (safemerge.demo.world_data)", "config": asdict(cfg),
              "aligned_how": "base + safety SFT (all parameters)"},
    )
