"""LoRA supervised fine-tuning with PEFT: the safety LoRA, the domain LoRA and the alignment SFT.

The model is trained on chat-formatted ``(prompt, response)`` pairs with the prompt masked
(:func:`safemerge.train.tokenize.encode_chat_example`), i.e. it minimises the answer-token
cross-entropy

    L(θ) = − (1/|R|) Σ_{t∈R} log p_θ(x_t | x_<t),   R = response + end-of-turn positions in the batch,

over the LoRA parameters only: each target weight becomes ``W + (α/r)·B A`` (Hu et al. 2021,
LoRA, Eq. 3) with ``B = 0`` at initialisation so training starts from the base model. This is
how the SafeMERGE paper (Djuhera et al. 2025, §4) builds both its fine-tuned task LoRA and its
safety LoRA, and how Hammoud et al. 2024 ("Model merging and safety alignment: one bad model
spoils the bunch", §3) fine-tune experts on their synthetic data.

With ``rejected`` answers (``safemerge safety-lora``: refusal openings after benign look-alikes) every step adds
``w · L_UL`` on a batch of them, the token-level unlikelihood of their first ``k`` tokens
(:func:`safemerge.train.loss.unlikelihood_loss`; Welleck et al. 2020, Eq. 4); ``w`` and ``k`` are the recipe's
``unlikelihood_weight`` and ``unlikelihood_tokens``.

Optimiser: AdamW (Loshchilov & Hutter 2019) without weight decay, gradient norm clipped to 1,
learning rate with linear warm-up over the first 10 % of steps and linear decay afterwards.

Determinism: the LoRA initialisation uses ``torch.manual_seed(seed)``, the data order comes from
a ``torch.Generator`` seeded with ``seed``, dropout masks (``lora_dropout``, off by default) from the
seeded global generator, and ``target_modules`` is written sorted; on one machine with one thread
count the same inputs give byte-identical adapter files.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safemerge.errors import ConfigError, SafemergeError
from safemerge.evaluate.generate import local_adapter, resolve_dtype
from safemerge.io.checkpoint import refuse_custom_code
from safemerge.io.hub import resolve_model_ref
from safemerge.io.output import atomic_output, check_output_path, chmod_to_umask, md_code, md_escape, write_model_card
from safemerge.options import RunOptions, or_default
from safemerge.progress import progress_bar
from safemerge.train.data import SFTRecord, load_sft_records
from safemerge.train.loss import answer_token_loss, unlikelihood_loss
from safemerge.train.recipe import LoraShape, TrainingRecipe
from safemerge.train.tokenize import IGNORE_INDEX, collate, encode_chat_example, first_answer_tokens

WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
TRAINING_LOG = "training_log.json"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay: the multiplier of the peak learning rate at update ``step`` (0-based).

    ``(step+1)/(warmup+1)`` during warm-up, ``(total-step)/(total-warmup)`` afterwards, so the
    rate is never zero on any update and reaches the peak at ``step == warmup``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _load_model_and_tokenizer(model: str | Path, trust_remote_code: bool = False):
    """The model (a directory, Hub id, or ``MODEL+ADAPTER`` with the adapter merged in) and its tokenizer."""

    path, adapter = resolve_model_ref(model)
    if not path.is_dir() or not (path / "config.json").exists():
        raise SafemergeError(f"model {str(model)!r} is not a Hugging Face model directory",
                             "pass a directory with config.json and weights")
    refuse_custom_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for missing tokenizer files
        raise SafemergeError(f"cannot load the tokenizer of {path} ({type(exc).__name__})",
                             "the model directory needs tokenizer files") from exc
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise SafemergeError(f"cannot load the model in {path} ({type(exc).__name__}: {str(exc)[:160]})",
                             "check the model directory") from exc
    if adapter is not None:
        lm = _merge_adapter(lm, adapter)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return path, lm, tok


def _merge_adapter(lm: Any, adapter: Path) -> Any:
    """``MODEL+ADAPTER``: train on top of the adapted model, ``W + s·B A`` merged into the weights (PEFT)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(lm, str(local_adapter(str(adapter))), is_trainable=False).merge_and_unload()


def _training_precision(precision: str | None) -> str:
    """``float32`` (default) or ``bfloat16`` (autocast); ``auto`` is the generation dtype decision
    (:func:`~safemerge.evaluate.generate.resolve_dtype`). float32 stays the default because bf16
    autocast changes what a LoRA learns enough to move the tiny CI world's SafeMERGE result
    (docs/training.md)."""

    chosen = "float32" if precision is None else resolve_dtype(precision, "cpu")
    if chosen not in ("float32", "bfloat16"):
        raise ConfigError(f"unsupported training precision {precision!r}", "use --precision float32 or bfloat16")
    return chosen


def _stored_dtype(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in ("float32", "bfloat16", "float16") else "float32"


def _batches(n: int, batch_size: int, total_steps: int, generator) -> Iterable[list[int]]:
    """Index batches: a fresh seeded permutation per epoch, cycling until ``total_steps`` batches.

    The last batch of an epoch may be smaller; batches never straddle epochs.
    """

    done = 0
    while done < total_steps:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]
            done += 1
            if done >= total_steps:
                return


def _model_card(out: Path, *, name: str, model: Path, merge: bool, n_records: int, n_tokens: int, hp: dict[str, Any],
                losses: list[float]) -> None:

    final = sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses[-max(1, len(losses) // 10):]))
    rows = "\n".join(f"| {md_escape(k)} | {md_escape(v)} |" for k, v in hp.items())
    what = "full model with the LoRA merged into the weights" if merge else "PEFT LoRA adapter"
    usage = (
        f"```python\nfrom transformers import AutoModelForCausalLM\nmodel = "
        f"AutoModelForCausalLM.from_pretrained('{name}')\n```"
        if merge
        else "```python\nfrom peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained('{name}')\n```\n\n"
        f"or reference it in a merge config as {md_code(f'{model.name}+{name}')}."
    )
    write_model_card(
        out,
        title=f"LoRA fine-tune of {model.name}",
        base_model=str(model),
        tags=("safemerge", "lora", "peft", "sft"),
        library_name="transformers" if merge else "peft",
        front_matter={"training": {"records": n_records, "response_tokens": n_tokens, "steps": len(losses),
                                   "final_loss": round(final, 6)}},
        sections=[
            ("What this is", f"A {what}, trained with `safemerge train-lora` on chat-formatted prompt/response pairs; "
             "prompt tokens are masked out of the loss (answer-token cross-entropy)."),
            ("Training",
             f"- records: {n_records}\n- labelled (response) tokens: {n_tokens}\n- optimizer steps: {len(losses)}\n"
             f"- first loss: {losses[0]:.4f}\n- final loss (mean of the last 10 % of steps): {final:.4f}"),
            ("Hyper-parameters", "| parameter | value |\n|---|---|\n" + rows),
            ("Usage", usage),
        ],
    )


def train_lora(
    model: str | Path,
    data: str | Path | Iterable[Any],
    out_dir: str | Path,
    *,
    shape: LoraShape = LoraShape(),
    recipe: TrainingRecipe = TrainingRecipe(),
    merge: bool = False,
    system: str | None = None,
    rejected: str | Path | Iterable[Any] | None = None,
    options: RunOptions | None = None,
) -> Path:
    """Fine-tune ``model`` with a LoRA on ``data`` and write the adapter (or the merged model).

    Args:
        model: Hugging Face model directory (with tokenizer and chat template), Hub id, or
            ``MODEL+ADAPTER`` (training starts from the model with that adapter merged in; the new
            adapter applies to that merged model, so ``merge=True`` gives a self-contained model).
        data: JSONL/JSON file or iterable of records (prompt/response, instruction/input/output,
            question/answer or messages — see :mod:`safemerge.train.data`).
        out_dir: output directory, written atomically.
        shape: the adapter: rank ``r``, ``lora_alpha`` (scaling ``α/r``), target module names or
            ``"all-linear"`` (:class:`~safemerge.train.recipe.LoraShape`).
        recipe: steps or epochs (default: 1 epoch), batch size, peak learning rate, tokens per example, LoRA
            dropout and precision (:class:`~safemerge.train.recipe.TrainingRecipe`). ``precision``: float32
            (default), bfloat16 or ``"auto"`` (the evaluation default of
            :func:`safemerge.evaluate.generate.resolve_dtype`: bf16 where the CPU has it natively); bfloat16 runs
            forward and backward under ``torch.autocast``; the LoRA and base weights, the optimiser state and
            the loss stay float32.
        merge: write a full model with ``W + (α/r) B A`` merged into the weights (stored in the
            base model's dtype) instead of the adapter.
        system: optional system message added to every example.
        rejected: answers to make unlikely (records as for ``data``: the prompt and the answer *not* to give); each
            step adds ``recipe.unlikelihood_weight`` × the unlikelihood of their first ``recipe.unlikelihood_tokens``
            tokens on a batch of them (see the module). ``None`` or a zero weight: plain SFT.
        options: ``seed`` (the LoRA initialisation, the data order and dropout masks), ``force`` (replace an
            existing ``out_dir``), ``progress`` (a rich bar on stderr with the running loss), ``trust_remote_code``
            (a model directory whose config names its own Python code; refused by default).

    Returns:
        ``out_dir``. It holds ``adapter_config.json`` + ``adapter_model.safetensors`` (or a
        model), the tokenizer, ``training_log.json`` (per-step loss, hyper-parameters) and a
        model card ``README.md``.
    """
    options = or_default(options)
    compute_dtype = _training_precision(recipe.precision)
    target_modules = shape.target_modules

    records = load_sft_records(data)
    inputs = (model, data if isinstance(data, (str, Path)) else None)
    check_output_path(out_dir, force=options.force, inputs=inputs)

    from peft import LoraConfig

    model_dir, lm, tok = _load_model_and_tokenizer(model, options.trust_remote_code)
    def encode(r: SFTRecord) -> dict[str, Any]:
        return encode_chat_example(tok, r.prompt, r.response, max_length=recipe.max_length,
                                   system=r.system if r.system is not None else system)

    examples = [encode(r) for r in records]
    use_rejected = rejected is not None and recipe.unlikelihood_weight > 0
    negatives = [first_answer_tokens(encode(r), recipe.unlikelihood_tokens)
                 for r in (load_sft_records(rejected) if use_rejected else [])]
    n_tokens = sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in examples)
    schedule = _Schedule.of(len(examples), recipe)
    cfg = LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=target_modules,
                     lora_dropout=recipe.dropout, bias="none", task_type="CAUSAL_LM")
    peft_model = _lora_model(lm, cfg, shape.targets, model_dir, seed=options.seed)
    losses, unlikely = _optimise(peft_model, examples, tok.pad_token_id, schedule, lr=recipe.lr, seed=options.seed,
                                 compute_dtype=compute_dtype, progress=options.progress, negatives=negatives,
                                 unlikelihood_weight=recipe.unlikelihood_weight)

    hp: dict[str, Any] = {
        "rank": shape.rank, "alpha": shape.alpha,
        "targets": target_modules if isinstance(target_modules, str) else ",".join(target_modules),
        "steps": schedule.total, "epochs": round(schedule.total / schedule.per_epoch, 4),
        "batch_size": recipe.batch_size, "lr": recipe.lr,
        "schedule": f"linear warm-up {schedule.warmup} steps, linear decay",
        "optimizer": "AdamW (no weight decay), grad-norm clip 1.0",
        "max_length": recipe.max_length, "seed": options.seed, "merge": merge, "lora_dropout": recipe.dropout,
        "precision": compute_dtype,
    }
    log: dict[str, Any] = {"records": len(examples), "response_tokens": n_tokens, "hyperparameters": hp,
                           "losses": losses}
    if negatives:
        hp |= {"unlikelihood": f"weight {recipe.unlikelihood_weight}, first {recipe.unlikelihood_tokens} tokens of "
                               f"{len(negatives)} rejected answers"}
        log |= {"rejected": len(negatives), "unlikelihood_losses": unlikely}
    _write_trained(out_dir, peft_model, tok, model=model, model_dir=model_dir, merge=merge, log=log,
                   force=options.force, inputs=inputs)
    return Path(out_dir)


@dataclass(frozen=True)
class _Schedule:
    """Examples per step, optimiser steps in all, batches per epoch and warm-up steps of one training run."""

    batch_size: int
    total: int
    per_epoch: int
    warmup: int

    @classmethod
    def of(cls, n: int, recipe: TrainingRecipe) -> _Schedule:
        """``recipe.steps`` if given, else ``recipe.epochs`` (default one) passes over ``n`` examples."""
        per_epoch = math.ceil(n / recipe.batch_size)
        epochs = recipe.epochs if recipe.epochs is not None else 1.0
        total = recipe.steps if recipe.steps is not None else max(1, round(per_epoch * epochs))
        return cls(batch_size=recipe.batch_size, total=total, per_epoch=per_epoch,
                   warmup=int(WARMUP_FRACTION * total))


def _lora_model(lm: Any, cfg: Any, targets: str | Sequence[str], model_dir: Path, *, seed: int) -> Any:
    """``lm`` wrapped with a freshly initialised LoRA (``torch.manual_seed(seed)`` first: deterministic)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    try:
        return get_peft_model(lm, cfg)
    except ValueError as exc:
        raise ConfigError(
            f"LoRA targets {targets!r} do not match modules of {model_dir.name} ({' '.join(str(exc).split())[:120]})",
            "use module names such as q_proj,v_proj (see the model's state dict) or all-linear",
        ) from exc


def _optimise(peft_model: Any, examples: list[dict[str, Any]], pad_id: int, schedule: _Schedule, *, lr: float,
              seed: int, compute_dtype: str, progress: bool, negatives: Sequence[dict[str, Any]] = (),
              unlikelihood_weight: float = 0.0) -> tuple[list[float], list[float]]:
    """The training loop (AdamW, warm-up + linear decay, grad-norm clip); returns the answer-token loss of every step
    and, with ``negatives``, their unlikelihood loss (batches of them drawn from their own seeded order)."""

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule.total, schedule.warmup))
    generator = torch.Generator().manual_seed(seed)
    rejected = iter(_batches(len(negatives), schedule.batch_size, schedule.total,
                             torch.Generator().manual_seed(seed + 1))) if negatives else None

    peft_model.train()
    losses: list[float] = []
    unlikely: list[float] = []
    with progress_bar("train-lora", total=schedule.total, unit="steps", fields=("loss",), enabled=progress) as bar:
        for idx in _batches(len(examples), schedule.batch_size, schedule.total, generator):
            batch = collate([examples[i] for i in idx], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
                sft = answer_token_loss(peft_model, batch)
                loss = sft
                if rejected is not None:
                    ul = unlikelihood_loss(peft_model, collate([negatives[i] for i in next(rejected)], pad_id))
                    loss = sft + unlikelihood_weight * ul
                    unlikely.append(float(ul.detach()))
            if not torch.isfinite(loss):
                raise SafemergeError(f"the training loss became {loss.item()} at step {len(losses) + 1}", "lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(sft.detach()))
            bar.advance(loss=f"{losses[-1]:.4f}")
    peft_model.eval()
    return losses, unlikely


def _write_trained(out_dir: str | Path, peft_model: Any, tok: Any, *, model: str | Path, model_dir: Path,
                   merge: bool, log: dict[str, Any], force: bool, inputs: tuple[Any, ...]) -> None:
    """The adapter (or, with ``merge``, the merged model), the tokenizer, the log and the card, atomically."""

    with atomic_output(out_dir, force=force, inputs=inputs) as tmp:
        if merge:
            merged = peft_model.merge_and_unload()
            merged.to(getattr(torch, _stored_dtype(model_dir)))
            merged.config.dtype = _stored_dtype(model_dir)
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            _stable_adapter_config(tmp / "adapter_config.json", model)
        tok.save_pretrained(tmp)
        (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
        _model_card(tmp, name=Path(out_dir).name, model=model_dir, merge=merge, n_records=log["records"],
                    n_tokens=log["response_tokens"], hp=log["hyperparameters"], losses=log["losses"])
        chmod_to_umask(tmp)  # transformers writes some files 0600


def _stable_adapter_config(cfg_file: Path, model: str | Path) -> None:
    """PEFT records the model path as loaded; keep it as the user gave it (stable across machines),
    and ``target_modules`` sorted (PEFT stores a set, whose order changes from run to run)."""
    acfg = json.loads(cfg_file.read_text())
    acfg["base_model_name_or_path"] = str(model)
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    cfg_file.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
