"""The objective L = L_safety + α·L_expert equals a hand computation (Hammoud et al. 2024, Eq. 5)."""
from __future__ import annotations

import math

import pytest
import torch
from optimize_world import EXPERT, SAFETY, WORDS


@pytest.fixture(scope="module")
def model_and_tok():
    from safemerge.testing import build_tokenizer, make_tiny_model

    torch.set_num_threads(1)
    return make_tiny_model("llama", seed=4), build_tokenizer(128, words=WORDS)


def _hand_loss(model, tok, prompt: str, response: str) -> float:
    """Mean −log p(answer token) computed token by token, unbatched, from the chat template."""
    p_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    prompt_ids = tok(p_ids, add_special_tokens=False)["input_ids"]
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_end = full_ids.index(end, len(prompt_ids)) + 1  # answer tokens + end-of-turn token
    ids = torch.tensor([full_ids[:answer_end]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    nll = [-float(logp[t - 1, full_ids[t]]) for t in range(len(prompt_ids), answer_end)]
    return sum(nll) / len(nll)


def _records(pairs):
    return [{"prompt": p, "response": r} for p, r in pairs]


def test_objective_equals_hand_computation(model_and_tok):
    from safemerge.optimize.objective import AnswerCEObjective

    model, tok = model_and_tok
    obj = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), alpha=0.3, batch_size=2, max_length=64)
    got = obj(model)
    ls = sum(_hand_loss(model, tok, p, r) for p, r in SAFETY) / len(SAFETY)
    le = sum(_hand_loss(model, tok, p, r) for p, r in EXPERT) / len(EXPERT)
    assert got.safety == pytest.approx(ls, rel=1e-5)
    assert got.expert == pytest.approx(le, rel=1e-5)
    assert got.loss == pytest.approx(ls + 0.3 * le, rel=1e-5)
    assert math.log(128) * 0.5 < got.safety < math.log(128) * 2  # a random model is near-uniform


def test_batch_size_does_not_change_the_value(model_and_tok):
    from safemerge.optimize.objective import AnswerCEObjective

    model, tok = model_and_tok
    a = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), batch_size=1)(model)
    b = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), batch_size=16)(model)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_single_set_and_alpha(model_and_tok):
    from safemerge.optimize.objective import AnswerCEObjective

    model, tok = model_and_tok
    only_e = AnswerCEObjective(tok, [], _records(EXPERT))(model)
    assert only_e.safety is None and only_e.loss == pytest.approx(only_e.expert)
    zero = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), alpha=0.0)(model)
    assert zero.loss == pytest.approx(zero.safety)


def test_bad_records_are_user_errors(model_and_tok):
    from safemerge.errors import SafemergeError
    from safemerge.optimize.objective import AnswerCEObjective, sample_records

    _, tok = model_and_tok
    with pytest.raises(SafemergeError, match="record 0"):
        AnswerCEObjective(tok, [{"prompt": "x"}], [])
    with pytest.raises(SafemergeError, match="no data"):
        AnswerCEObjective(tok, [], [])
    recs = [{"i": i} for i in range(20)]
    s1, s2 = sample_records(recs, 5, 0), sample_records(recs, 5, 0)
    assert s1 == s2 and len(s1) == 5 and [r["i"] for r in s1] == sorted(r["i"] for r in s1)
    assert sample_records(recs, None, 0) == recs


def test_safety_tokens_limits_the_safety_loss_to_the_first_answer_tokens(model_and_tok):
    """objective.safety_tokens = K: L_safety is the mean CE of each D_safety answer's first K tokens (computed by
    hand here); L_expert keeps every answer token."""
    import torch.nn.functional as F

    from safemerge.optimize.objective import AnswerCEObjective
    from safemerge.train.tokenize import encode_chat_example

    model, tok = model_and_tok
    k = 2

    def first_k(prompt, response):
        e = encode_chat_example(tok, prompt, response, max_length=64)
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        answer = [t for t, lab in enumerate(e["labels"]) if lab != -100][:k]
        return sum(-float(logp[t - 1, e["input_ids"][t]]) for t in answer) / len(answer)

    got = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), batch_size=3, max_length=64,
                            safety_tokens=k)(model)
    full = AnswerCEObjective(tok, _records(SAFETY), _records(EXPERT), batch_size=3, max_length=64)(model)
    assert got.safety == pytest.approx(sum(first_k(p, r) for p, r in SAFETY) / len(SAFETY), rel=1e-5)
    assert got.expert == pytest.approx(full.expert, rel=1e-6)
    with pytest.raises(Exception, match="safety_tokens"):
        AnswerCEObjective(tok, _records(SAFETY), [], safety_tokens=0)
