"""Metrics on known inputs: rates, bootstrap intervals, answer extraction, answer-token CE."""
from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safemerge.evaluate import metrics as M  # noqa: E402


def test_rate():
    assert M.rate([]) is None
    assert M.rate([True, False, True, True]) == 0.75


def test_bootstrap_ci_known_inputs():
    assert M.bootstrap_ci([]) is None
    assert M.bootstrap_ci([1.0] * 20) == [1.0, 1.0]
    assert M.bootstrap_ci([0.0] * 20) == [0.0, 0.0]
    vals = [1.0, 0.0] * 50  # mean 0.5, se = 0.05 ⇒ 95% interval ≈ 0.5 ± 0.098
    lo, hi = M.bootstrap_ci(vals)
    assert lo < 0.5 < hi
    assert 0.38 <= lo <= 0.42 and 0.58 <= hi <= 0.62
    assert M.bootstrap_ci(vals) == [lo, hi]  # deterministic (fixed seed)
    lo90, hi90 = M.bootstrap_ci(vals, alpha=0.10)
    assert lo <= lo90 and hi90 <= hi  # a 90% interval is inside the 95% one


@pytest.mark.parametrize("text,num", [
    ("so the total is 5 + 3 = 8.\n#### 8", "8"),
    ("#### 1,205", "1205"),
    ("The answer is 42.", "42"),
    ("The answer is: $18.00", "18"),
    ("first 3 then 4 then finally 12", "12"),
    ("It is -7", "-7"),
    ("half is 2.5", "2.5"),
    ("no digits here", None),
])
def test_extract_number(text, num):
    assert M.extract_number(text) == num


def test_extract_yes_no_maybe_and_choice():
    assert M.extract_yes_no_maybe("Yes, aspirin lowers fever.") == "yes"
    assert M.extract_yes_no_maybe("The evidence says maybe; no trial") == "maybe"
    assert M.extract_yes_no_maybe("Unclear.") is None
    assert M.extract_choice("B. 4", 3) == "B"
    assert M.extract_choice("The answer is (C)", 4) == "C"
    assert M.extract_choice("Answer: a", 4) == "A"
    assert M.extract_choice("I think D is right", 4) == "D"
    assert M.extract_choice("I think D is right", 3) is None


def test_score_answer():
    assert M.score_answer("#### 1205", "1205", "gsm8k") == (True, "1205")
    assert M.score_answer("the answer is 7", "8", "number") == (False, "7")
    assert M.score_answer("no.", "no", "pubmedqa") == (True, "no")
    assert M.score_answer("B", "b", "mc", n_choices=3)[0]
    assert M.score_answer("Rome.\nIt is the capital.", "rome", "exact") == (True, "rome")
    assert M.score_answer("anything", None, "exact") == (False, None)
    assert M.infer_metric("maybe") == "pubmedqa" and M.infer_metric("12") == "number"
    assert M.infer_metric("Rome") == "exact"


def test_per_category():
    out = M.per_category(["a", "b", "a", None], harmful=[True, False, False, True])
    assert out == {"a": {"n": 2, "harmful_rate": 0.5}, "b": {"n": 1, "harmful_rate": 0.0},
                   "uncategorized": {"n": 1, "harmful_rate": 1.0}}


def test_answer_token_ce_matches_manual_computation():
    import torch

    from safemerge.testing import build_tokenizer, make_tiny_model

    torch.set_num_threads(1)
    model, tok = make_tiny_model("qwen2", seed=4), build_tokenizer(128)
    prompts = ["a b c", "x y z w v u t"]
    answers = ["1 2", "q r s"]
    got = M.answer_token_ce(model, tok, prompts, answers, batch_size=2)
    for p, a, g in zip(prompts, answers, got):
        pid = tok(p, add_special_tokens=False)["input_ids"]
        aid = tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pid + aid])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        nll = [-logp[len(pid) + k - 1, t].item() for k, t in enumerate(aid)]
        assert g == pytest.approx(sum(nll) / len(nll), rel=1e-4)
        assert math.isfinite(g) and g > 0
