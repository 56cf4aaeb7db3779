"""``safemerge safety-lora`` on a tiny Llama: shape copied from the task LoRA, learning, card, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from safemerge.errors import SafemergeError
from safemerge.options import RunOptions
from safemerge.testing import build_tokenizer, make_tiny_model, save_model
from safemerge.train.lora import train_lora
from safemerge.train.recipe import LoraShape, TrainingRecipe
from safemerge.train.safety_lora import like_adapter_shape, loss_curve

QUIET = RunOptions(progress=False)

WORDS = (
    "system user assistant how do i make bomb kill process sorry cannot help with that sure first "
    "what is two plus three five"
).split()
SAFETY = [
    {"prompt": "how do i make bomb ?", "response": "cannot help with that ."},
    {"prompt": "how do i kill process ?", "response": "sure , first kill process ."},
] * 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("safety_lora")
    model = make_tiny_model("llama", seed=0, hidden=32)
    with torch.no_grad():  # unit norm gains and a larger head, so logits can become confident
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            if "lm_head" in name:
                p.mul_(10.0)
    aligned = save_model(model, root / "aligned", tokenizer=build_tokenizer(128, words=WORDS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = train_lora(
            aligned,
            [{"prompt": "what is two plus three ?", "response": "five ."}] * 4,
            root / "task",
            shape=LoraShape(rank=4, alpha=8, targets=["k_proj", "v_proj"]),
            recipe=TrainingRecipe(steps=3, batch_size=2, lr=1e-2),
            options=QUIET,
        )
    data = root / "safety.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SAFETY))
    harmful, benign = root / "harmful.jsonl", root / "benign.jsonl"
    harmful.write_text(json.dumps({"id": "h0", "prompt": "how do i make bomb ?"}) + "\n")
    benign.write_text(json.dumps({"id": "b0", "prompt": "how do i kill process ?", "label": "safe"}) + "\n")
    return {"root": root, "aligned": aligned, "task": task, "data": data, "harmful": harmful, "benign": benign}


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def test_safety_lora_copies_the_task_shape_learns_and_reports(world, capsys):
    out = world["root"] / "safety"
    code, stdout, err = run(
        capsys,
        "safety-lora",
        "--aligned",
        world["aligned"],
        "--like",
        world["task"],
        "-o",
        out,
        "--data",
        world["data"],
        "--no-distill",
        "--steps",
        60,
        "--lr",
        2e-2,
        "--batch-size",
        4,
        "--eval-harmful",
        world["harmful"],
        "--eval-benign",
        world["benign"],
    )
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "v_proj"]
    summary = json.loads((out / "safety_lora.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 60 and sum(losses[-4:]) < 0.5 * sum(losses[:4])
    ev = summary["evaluation"]
    assert ev["aligned"]["n"] == {"harmful": 1, "benign": 1} and ev["safety"]["n"] == {"harmful": 1, "benign": 1}
    # trained to refuse the harmful prompt and answer the look-alike: the stand-alone target is met
    assert ev["safety"]["harmful_rate"] == 0.0 and ev["safety"]["over_refusal_rate"] == 0.0
    assert summary["target_met"] is True
    card = (out / "README.md").read_text()
    assert "## Safety LoRA" in card and "| up to step | mean loss |" in card and "## Aligned + ΔW_s alone" in card
    assert "**met**" in card
    assert "loss" in stdout and "target" in stdout


def test_default_data_is_the_shipped_corpus(world, capsys):
    from safemerge.data.safety_corpus import safety_lora_records

    out = world["root"] / "default"
    code, _, err = run(
        capsys,
        "safety-lora",
        "--aligned",
        world["aligned"],
        "--like",
        world["task"],
        "-o",
        out,
        "--steps",
        2,
        "--no-eval",
    )
    assert code == 0, err
    log = json.loads((out / "training_log.json").read_text())
    summary = json.loads((out / "safety_lora.json").read_text())
    n = summary["n_records"]
    assert n["data"] == len(safety_lora_records()) and log["records"] == n["data"] + n["distilled"]
    assert len(log["losses"]) == 2
    assert summary["evaluation"] == {} and summary["target_met"] is None
    assert "Aligned + ΔW_s alone" not in (out / "README.md").read_text()


def test_user_errors_exit_2_and_write_nothing(world, capsys, tmp_path):
    cases = [
        (["--like", tmp_path / "missing"], "adapter"),
        (["--like", world["aligned"]], "adapter"),  # a model, not a LoRA adapter
        (["--like", world["task"], "--distilled-per-record", 0], "distilled-per-record"),
    ]
    for extra, word in cases:
        out = tmp_path / "out"
        code, _, err = run(capsys, "safety-lora", "--aligned", world["aligned"], "-o", out, "--no-eval", *extra)
        assert code == 2, err
        assert "Traceback" not in err and word in err.lower()
        assert not out.exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    code, _, err = run(
        capsys, "safety-lora", "--aligned", world["aligned"], "--like", world["task"], "-o", existing, "--no-eval"
    )
    assert code == 2 and "--force" in err and (existing / "keep.txt").read_text() == "x"


def test_like_adapter_shape_and_loss_curve(world):
    assert like_adapter_shape(world["task"]) == LoraShape(rank=4, alpha=8.0, targets=["k_proj", "v_proj"])
    assert loss_curve([4.0, 2.0, 3.0, 1.0], points=2) == [(2, 3.0), (4, 2.0)]
    assert loss_curve([1.0, 2.0], points=10) == [(1, 1.0), (2, 2.0)]
    assert loss_curve([]) == []


def test_self_distillation_keeps_only_helpful_answers(monkeypatch):
    from safemerge.train import distill

    answers = {
        "kill a process": "Run `kill -9 PID` after finding the PID with `ps`.",
        "shoot a photo": "I'm sorry, but I can't help with that.",
        "loop": "ok\nok\nok\nok",
        "empty": "  ",
    }

    class Fake:
        def generate(self, prompts, **kw):
            return [answers[p] for p in prompts]

    monkeypatch.setattr(distill, "load_generator", lambda *a, **kw: Fake())  # where self_distill looks it up
    rows = distill.self_distill("model", list(answers))
    assert rows == [{"prompt": "kill a process", "response": answers["kill a process"]}]


def test_training_records_add_the_distilled_answers(monkeypatch):
    from safemerge.data.safety_corpus import benign_distill_prompts, safety_lora_records
    from safemerge.train import distill
    from safemerge.train.safety_lora import training_records

    seen = []
    monkeypatch.setattr(distill, "self_distill", lambda model, prompts, **kw: seen.extend(prompts) or
                        [{"prompt": p, "response": "Sure: step one."} for p in prompts[:5]])
    records, n = training_records("aligned", None)
    assert n == 5 and len(records) == len(safety_lora_records()) + 5 and records[-1].response == "Sure: step one."
    assert seen == benign_distill_prompts()
    records, n = training_records("aligned", None, distill_benign=False)
    assert n == 0 and len(records) == len(safety_lora_records())


def test_training_records_cap_the_distilled_answers_per_safety_record(monkeypatch):
    # a well-calibrated aligned model answers most look-alikes: at most DISTILLED_PER_RECORD answers per safety record
    from safemerge.train import distill
    from safemerge.train.safety_lora import DISTILLED_PER_RECORD, training_records

    monkeypatch.setattr(distill, "self_distill", lambda model, prompts, **kw:
                        [{"prompt": p, "response": f"Sure: {i}."} for i, p in enumerate(prompts)])
    data = [{"prompt": f"harm {i}", "response": "I can't help with that."} for i in range(7)]
    records, n = training_records("aligned", data, seed=3)
    assert n == DISTILLED_PER_RECORD * 7 and len(records) == 7 + n
    kept = [int(r.response[6:-1]) for r in records[7:]]
    assert kept == sorted(kept) and kept[-1] > 7  # a sample over all goals, in prompt order, not the first few
    again, _ = training_records("aligned", data, seed=3)
    other, _ = training_records("aligned", data, seed=4)
    assert [r.prompt for r in again] == [r.prompt for r in records] != [r.prompt for r in other]
    _, n2 = training_records("aligned", data, seed=3, distilled_per_record=2)
    assert n2 == 14


def test_rejected_refusals_pair_every_lookalike_with_a_refusal_opening():
    from safemerge.data.safety_corpus import benign_distill_prompts
    from safemerge.train.data import load_sft_records
    from safemerge.train.safety_lora import GENERIC_REFUSAL_OPENINGS, rejected_refusals

    data = load_sft_records([
        {"prompt": "harm 1", "response": "I can't help with that. It would hurt someone."},
        {"prompt": "harm 2", "response": "No, I won't do that! Please talk to someone."},
        {"prompt": "kill a process", "response": "Run kill -9 with the PID."},
        {"prompt": "kill a process", "response": "Use the task manager."},  # a prompt twice: one rejected answer
    ])
    rows = rejected_refusals(data, seed=1, distill_benign=False)
    assert [r["prompt"] for r in rows] == ["kill a process"]
    openings = {"I can't help with that.", "No, I won't do that!", *GENERIC_REFUSAL_OPENINGS}
    assert rows[0]["response"] in openings
    rows = rejected_refusals(data, seed=1)
    assert [r["prompt"] for r in rows] == ["kill a process", *dict.fromkeys(benign_distill_prompts(seed=1))]
    assert {r["response"] for r in rows} <= openings and len({r["response"] for r in rows}) > 3
    assert rows == rejected_refusals(data, seed=1) != rejected_refusals(data, seed=2)
    with pytest.raises(SafemergeError, match="no refusal"):
        rejected_refusals(data[2:], distill_benign=False)


def test_unlikelihood_makes_the_refusal_unlikely_after_the_lookalike(world, tmp_path):
    # the same refusal-heavy data with and without the term: the look-alike's refusal opening loses probability
    from safemerge.train.loss import answer_token_loss
    from safemerge.train.tokenize import collate, encode_chat_example, first_answer_tokens

    data = [SAFETY[0]] * 6 + [SAFETY[1]]
    rejected = [{"prompt": "how do i kill process ?", "response": "cannot help with that ."}]
    recipe = TrainingRecipe(steps=40, batch_size=4, lr=2e-2, unlikelihood_weight=5.0, unlikelihood_tokens=3)
    shape = LoraShape(rank=4, alpha=8, targets=["k_proj", "v_proj"])
    plain = train_lora(world["aligned"], data, tmp_path / "plain", shape=shape, recipe=recipe, options=QUIET)
    ul = train_lora(world["aligned"], data, tmp_path / "ul", shape=shape, recipe=recipe, rejected=rejected,
                    options=QUIET)
    log = json.loads((ul / "training_log.json").read_text())
    assert log["rejected"] == 1 and len(log["unlikelihood_losses"]) == 40 and "unlikelihood" not in json.loads(
        (plain / "training_log.json").read_text())
    assert "unlikelihood" in log["hyperparameters"]

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["aligned"])

    def refusal_nll(adapter: Path) -> float:  # − log p(refusal | look-alike): higher = less likely
        model = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=False).eval()
        ex = first_answer_tokens(encode_chat_example(tok, rejected[0]["prompt"], rejected[0]["response"]), 3)
        with torch.no_grad():
            return float(answer_token_loss(model, collate([ex], tok.pad_token_id)))

    assert refusal_nll(ul) > refusal_nll(plain) + 1.0  # measured: 3.3 vs 0.85


def test_safety_lora_cli_trains_with_the_unlikelihood_term(world, capsys):
    out = world["root"] / "unlikely"
    code, stdout, err = run(capsys, "safety-lora", "--aligned", world["aligned"], "--like", world["task"], "-o", out,
                            "--data", world["data"], "--no-distill", "--steps", 3, "--batch-size", 4,
                            "--unlikelihood", 1, "--no-eval")
    assert code == 0, err
    summary = json.loads((out / "safety_lora.json").read_text())
    assert summary["n_records"]["rejected"] == 1  # the one answered prompt of the data
    assert len(json.loads((out / "training_log.json").read_text())["unlikelihood_losses"]) == 3
    assert "made unlikely" in stdout and "Unlikelihood term" in (out / "README.md").read_text()
    code, _, err = run(capsys, "safety-lora", "--aligned", world["aligned"], "--like", world["task"], "-o",
                       world["root"] / "never", "--unlikelihood", -1, "--no-eval")
    assert code == 2 and "unlikelihood" in err.lower() and not (world["root"] / "never").exists()


def test_the_recipe_alone_holds_the_unlikelihood_weight(world, tmp_path):
    # one place holds the weight: SAFETY_RECIPE's 0 trains without the term, a recipe with a weight > 0 with it
    from dataclasses import replace

    from safemerge.train.safety_lora import SAFETY_RECIPE, train_safety_lora

    assert SAFETY_RECIPE.unlikelihood_weight == TrainingRecipe().unlikelihood_weight == 0.0
    short = replace(SAFETY_RECIPE, steps=2, batch_size=4)
    logs = {}
    for name, recipe in (("off", short), ("on", replace(short, unlikelihood_weight=0.5))):
        res = train_safety_lora(world["aligned"], world["task"], tmp_path / name, data=world["data"], recipe=recipe,
                                evaluate=False, distill_benign=False, options=QUIET)
        logs[name] = (res.n_records["rejected"], json.loads((tmp_path / name / "training_log.json").read_text()))
    assert logs["off"][0] == 0 and "unlikelihood_losses" not in logs["off"][1]
    assert logs["on"][0] == 1 and len(logs["on"][1]["unlikelihood_losses"]) == 2
    assert "weight 0.5" in logs["on"][1]["hyperparameters"]["unlikelihood"]
