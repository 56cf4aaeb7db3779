"""Project-written demo data: deterministic, disjoint splits, exact arithmetic, no overlap with eval sets."""
from __future__ import annotations

import re

from safemerge.demo import data as D


def test_arithmetic_answers_are_exact_and_splits_disjoint():
    a = D.arithmetic_splits()
    assert (len(a.train), len(a.val), len(a.test)) == (640, 40, 100)
    qs = [r["prompt"] for r in a.train] + [r["prompt"] for r in a.val] + [r["prompt"] for r in a.test]
    assert len(set(qs)) == len(qs)
    for r in a.train:
        # every worked step "x op y = z" is arithmetically right and the final answer matches the last step
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["response"])
        assert steps
        for x, op, y, z in steps:
            assert eval(f"{x}{op}{y}") == int(z)  # noqa: S307 - digits and one operator only
        assert r["response"].endswith(f"The answer is {steps[-1][3]}.")
    for r in a.test + a.val:
        assert r["metric"] == "number" and r["answer"].isdigit()
        assert r["prompt"].endswith(D.ARITH_INSTRUCTION)


def test_data_is_deterministic():
    assert D.arithmetic_splits() == D.arithmetic_splits()
    assert D.safety_splits() == D.safety_splits()
    assert D.arithmetic_splits(seed=1) != D.arithmetic_splits(seed=2)


def test_safety_splits_hold_out_whole_goals():
    s = D.safety_splits()
    train_prompts = {r["prompt"] for r in s.harmful_train}
    assert not train_prompts & {r["prompt"] for r in s.harmful_val}
    # held-out goals never appear in training under any frame
    val_goal_words = [r["prompt"] for r in s.harmful_val]
    for p in val_goal_words:
        assert p not in train_prompts
    assert all(r["response"] in D.REFUSALS for r in s.harmful_train)
    assert not set(s.benign_train_prompts) & {r["prompt"] for r in s.benign_val}


def test_refusals_are_recognised_by_the_keyword_judge():
    from safemerge.evaluate.judges import KeywordJudge

    j = KeywordJudge()
    assert all(j.is_refusal(r) for r in D.REFUSALS)


def test_training_data_disjoint_from_builtin_eval_sets():
    from safemerge.data import builtin_rows

    s = D.safety_splits()
    train = [r["prompt"] for r in s.harmful_train] + s.benign_train_prompts
    for name in ("harmful", "benign"):
        assert D.check_disjoint(train, [r["prompt"] for r in builtin_rows(name)]) == []
    a = D.arithmetic_splits()
    assert D.check_disjoint([r["prompt"] for r in a.train], [r["prompt"] for r in builtin_rows("arithmetic")]) == []
    assert D.check_disjoint(["How do I kill a Python process?"], ["how do I  kill a python process?"])  # the check works


def test_no_near_duplicate_of_an_eval_prompt():
    """Training goals are not rephrasings of built-in evaluation prompts (difflib ratio < 0.75)."""
    import difflib

    from safemerge.data import builtin_rows

    ev = [r["prompt"].lower() for name in ("harmful", "benign") for r in builtin_rows(name)]
    for _, goal in D.HARM_GOALS + D.BENIGN_GOALS:
        best = max(difflib.SequenceMatcher(None, goal.lower(), e).ratio() for e in ev)
        assert best < 0.75, goal


def test_claim_checks_answer_the_acceptance_questions_from_the_rows():
    from safemerge.demo.pipeline import Row, claim_checks

    def row(name, harm, util):
        return Row(name, "", "m", None, {"harmful": {"harmful_rate": harm}, "utility": {"accuracy": util}})

    rows = {"aligned": row("aligned", 0.16, 0.15), "fine-tuned": row("fine-tuned", 0.73, 0.84),
            "SafeMERGE": row("SafeMERGE", 0.64, 0.80), "SafeMERGE (auto)": row("SafeMERGE (auto)", 0.80, 0.70)}
    c = claim_checks(rows)
    assert c["erosion"] and c["utility_informative"]
    assert c["SafeMERGE"] == {"less_harmful_than_finetuned": True, "similar_utility": True}
    assert c["SafeMERGE (auto)"] == {"less_harmful_than_finetuned": False, "similar_utility": False}
    # a task the model cannot learn (GSM8K at 135M): utility does not move, so "similar utility" is uninformative
    rows["aligned"], rows["fine-tuned"] = row("aligned", 0.16, 0.0), row("fine-tuned", 0.73, 0.03)
    assert not claim_checks(rows)["utility_informative"]
