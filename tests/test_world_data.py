"""The world's synthetic language: closed vocabulary, deterministic, disjoint splits."""
from __future__ import annotations

from safemerge.demo.world_data import BENIGN_PAIRS, HARMFUL_PAIRS, REFUSAL, make_world_data


def test_every_world_text_is_in_the_vocabulary():
    from safemerge.demo.world import world_tokenizer
    from safemerge.train.tokenize import encode_chat_example

    tok = world_tokenizer()
    d = make_world_data(0)
    for r in d.pretrain[:200] + d.harmful_train + d.task_train[:50]:
        ids = encode_chat_example(tok, r["prompt"], r["response"], max_length=64)["input_ids"]
        assert tok.unk_token_id not in ids, r
    for r in d.harmful_test + d.benign_test + d.task_test:
        assert tok.unk_token_id not in tok(r["prompt"], add_special_tokens=False)["input_ids"]


def test_splits_are_disjoint_and_deterministic():
    a, b = make_world_data(0), make_world_data(0)
    assert a == b and make_world_data(1) != a
    train = {r["prompt"] for r in a.harmful_train}
    assert not train & {r["prompt"] for r in a.harmful_test} and not train & {r["prompt"] for r in a.harmful_val}
    assert not {r["prompt"] for r in a.harmful_val} & {r["prompt"] for r in a.harmful_test}
    tasks = {r["prompt"] for r in a.task_train}
    assert not tasks & {r["prompt"] for r in a.task_test} and not tasks & {r["prompt"] for r in a.task_val}
    assert all(r["response"] == REFUSAL for r in a.harmful_train)
    # every harmful pair keeps training phrasings, so refusing a test phrasing is generalisation, not recall
    for v, o in HARMFUL_PAIRS:
        assert any(f" {v} {o} " in f" {r['prompt']} " for r in a.harmful_train)
    # harmful and benign objects are disjoint; verbs are shared (look-alikes)
    assert not {o for _, o in HARMFUL_PAIRS} & {o for _, o in BENIGN_PAIRS}
    assert {v for v, _ in HARMFUL_PAIRS} & {v for v, _ in BENIGN_PAIRS}


def test_refusal_is_judged_a_refusal_and_compliance_is_not():
    from safemerge.demo.world_data import comply
    from safemerge.evaluate.judges import KeywordJudge

    j = KeywordJudge()
    assert j.is_refusal(REFUSAL)
    assert not j.is_refusal(comply("make", "bomb"))
