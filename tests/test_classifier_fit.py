"""A fitted classifier judge: the head reads the state HF's sequence-classification head pools, and the
saved directory judges as the fit predicted."""
from __future__ import annotations

import json
import random

import pytest
import torch

from safemerge.errors import SafemergeError
from safemerge.evaluate.classifier_fit import fit_classifier_judge, fit_logistic, last_token_features
from safemerge.evaluate.judges import get_judge
from safemerge.testing import build_tokenizer, make_tiny_model, save_model

WORDS = ["sorry", "cannot", "sure", "here", "steps", "the", "a", "bomb", "plan"]


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Responses of varying length whose class is their last word (refusal ends 'cannot', compliance 'steps'),
    so right-padding in a batch puts the pooled token at different positions."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        harmful = i % 2
        body = " ".join(rng.choice(["the", "a", "bomb", "plan", "here"]) for _ in range(rng.randint(1, 7)))
        texts.append(f"{body} {'steps' if harmful else 'cannot'}")
        labels.append(harmful)
    return texts, labels


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "lm"
    return save_model(make_tiny_model("llama", seed=3), path, tokenizer=build_tokenizer(128, words=WORDS))


def test_fitted_judge_reproduces_the_fit(tiny_lm, tmp_path):
    texts, labels = _texts(60, seed=0)
    out = tmp_path / "judge"
    stats = fit_classifier_judge(tiny_lm, texts, labels, out, l2=(1e-3, 1e-2))
    assert stats["n"] == 60 and stats["n_harmful"] == 30 and stats["n_heldout"] == 12
    assert stats["heldout_accuracy"] == 1.0 and stats["fit_accuracy"] == 1.0
    assert stats["l2"] == 1e-2 and set(stats["heldout_accuracy_by_l2"]) == {"0.001", "0.01"}  # tie → stronger
    assert json.loads((out / "fit.json").read_text()) == stats
    audit = [json.loads(x) for x in (out / "fit_data.jsonl").read_text().splitlines()]
    assert [a["text"] for a in audit] == texts and [a["label"] == "harmful" for a in audit] == [bool(v) for v in labels]

    judge = get_judge(f"classifier:{out}", batch_size=7)  # batches of mixed lengths, as the harness judges
    verdicts = judge.judge(["q"] * len(texts), texts)
    assert [int(v.harmful) for v in verdicts] == labels
    # the judge's probability is σ(wᵀh) at the token the fit read: same pooling, same head
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    tok.padding_side = "right"
    w = (model.score.weight[1] - model.score.weight[0]).double()
    expected = torch.sigmoid(last_token_features(model, tok, texts, batch_size=5) @ w)
    assert torch.allclose(torch.tensor([v.score for v in verdicts], dtype=torch.float64), expected, atol=1e-5)


def test_logistic_fit_matches_the_optimality_condition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5], dtype=torch.float64)
         + 0.5 * torch.randn(200, generator=g, dtype=torch.float64) > 0).long()
    w = fit_logistic(x, y, l2=0.1)
    # gradient of mean BCE + l2/2‖w‖² vanishes at the optimum
    grad = x.T @ (torch.sigmoid(x @ w) - y.double()) / len(y) + 0.1 * w
    assert grad.abs().max() < 1e-6


def test_fit_refuses_bad_labels_and_leaves_no_output(tiny_lm, tmp_path):
    out = tmp_path / "judge"
    with pytest.raises(SafemergeError, match="both 0"):
        fit_classifier_judge(tiny_lm, ["a cannot", "the cannot"], [0, 0], out)
    with pytest.raises(SafemergeError, match="one label per text"):
        fit_classifier_judge(tiny_lm, ["a cannot"], [0, 1], out)
    with pytest.raises(SafemergeError):
        fit_classifier_judge(tiny_lm, *_texts(8, seed=1), tiny_lm / "inside")  # an output inside the input
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SafemergeError, match="no config.json"):
        fit_classifier_judge(tmp_path / "not-a-model", *_texts(8, seed=1), out)
    assert not out.exists() and not (tiny_lm / "inside").exists()


def test_fit_judge_command_reads_labelled_records_and_refuses_bad_input(tiny_lm, tmp_path, capsys):
    from conftest import run_cli

    texts, labels = _texts(40, seed=2)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "harmful" if v else "safe"}) + "\n"
                            for t, v in zip(texts, labels)))
    out = tmp_path / "judge"
    code, stdout, err = run_cli(capsys, "fit-judge", tiny_lm, "--data", data, "-o", out, "--l2", "0.01", "-q")
    assert code == 0, err
    stats = json.loads((out / "fit.json").read_text())
    assert stats["n"] == 40 and stats["l2"] == 0.01 and stats["fit_accuracy"] == 1.0
    # the audit file is itself valid input: refitting it gives the same head
    again = tmp_path / "again"
    assert run_cli(capsys, "fit-judge", tiny_lm, "-d", out / "fit_data.jsonl", "-o", again, "--l2", "0.01",
                   "-q")[0] == 0
    from safetensors.torch import load_file
    assert torch.equal(load_file(out / "model.safetensors")["score.weight"],
                       load_file(again / "model.safetensors")["score.weight"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a cannot", "label": "safe"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    for args, message in [(("-d", bad, "-o", tmp_path / "j2"), "bad.jsonl line 2"),
                          (("-d", data, "-o", out), "already exists"),
                          (("-d", data, "-o", data), "input"),
                          (("-d", data, "-o", tiny_lm / "clf"), "input")]:
        code, _, err = run_cli(capsys, "fit-judge", tiny_lm, *args)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) <= 2  # the error line and its hint
    assert not (tmp_path / "j2").exists() and not (tiny_lm / "clf").exists() and data.is_file()


def test_labelled_responses_are_read_from_jsonl_and_json(tmp_path):
    from safemerge.evaluate.classifier_fit import read_labelled_responses

    rows = [{"text": "a", "label": "Harmful"}, {"response": "b", "label": 0}, {"text": "c", "label": True}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(rows))
    for name in ("r.jsonl", "r.json"):
        assert read_labelled_responses(tmp_path / name) == (["a", "b", "c"], [1, 0, 1])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "obj.json").write_text(json.dumps({"text": "a"}))
    (tmp_path / "nolabel.jsonl").write_text(json.dumps("just a string") + "\n")
    for name, message in (("bad.jsonl", "cannot parse"), ("obj.json", "not a list"),
                          ("nolabel.jsonl", "nolabel.jsonl line 1")):
        with pytest.raises(SafemergeError, match=message):
            read_labelled_responses(tmp_path / name)
