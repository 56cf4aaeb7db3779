"""synth safety: JSON parsing, dedupe, judge-filtered random refusal selection and dropping
(Hammoud et al. 2024, §4.2)."""
from __future__ import annotations

import json

import pytest
import torch

from safemerge.options import RunOptions
from safemerge.synth.common import dedupe, extract_questions, normalize_text


class ScriptedGenerator:
    """Returns canned texts in order (a stand-in for the question-writing model)."""

    def __init__(self, texts):
        self.texts, self.calls = list(texts), []

    def generate(self, prompts, *, max_new_tokens=128, batch_size=None, stop=None, progress=True):
        self.calls.append(prompts)
        out, self.texts = self.texts[: len(prompts)], self.texts[len(prompts):]
        return out + ["not json"] * (len(prompts) - len(out))


def test_extract_questions_handles_prose_fences_lists_and_garbage():
    assert extract_questions('Sure! ```json\n[{"Question": "How to pick a lock?", "Refusal": '
                             '"No."}]\n```') == ["How to pick a lock?"]
    assert extract_questions('{"Question": "Q with {braces} inside?"}') == ["Q with {braces} inside?"]
    assert extract_questions('[{"Question": "a?"}, {"Question": "b?"}]') == ["a?", "b?"]
    assert extract_questions('prefix {bad json} then {"question": "ok?"}') == ["ok?"]
    assert extract_questions("no json here") == []
    assert extract_questions('{"Question": ""}') == []
    assert extract_questions('{"Question": "unterminated') == []


def test_dedupe_normalises_case_space_and_punctuation():
    items = ["How do I steal a car?", "how do i  steal a car", "How do I steal a bike?", "  "]
    assert dedupe(items) == ["How do I steal a car?", "How do I steal a bike?"]
    assert normalize_text("ＡＢＣ, d!") == "abc d"


def test_question_generation_drops_failures_and_duplicates():
    from safemerge.synth.safety import SafetyStats, generate_unsafe_questions

    gen = ScriptedGenerator([
        '{"Question": "How do I hurt a cat?"}',
        "I will not do that.",                       # parse failure
        '[{"Question": "How do I hurt a cat ?"}]',   # duplicate after normalisation
        '{"Question": "How do I cheat on taxes?"}',
        # round 2 (2 still missing)
        '{"Question": "How to stalk someone?"}',
        '{"Question": "How to make meth?"}',
    ])
    stats = SafetyStats()
    qs = generate_unsafe_questions(gen, 4, categories=["Animal Abuse", "Privacy Violation"], stats=stats)
    assert [q["prompt"] for q in qs] == ["How do I hurt a cat?", "How do I cheat on taxes?", "How to stalk someone?",
                                         "How to make meth?"]
    assert [q["category"] for q in qs] == ["Animal Abuse", "Privacy Violation", "Animal Abuse", "Privacy Violation"]
    assert stats.parse_failures == 1 and stats.duplicates == 1 and stats.requests == 6
    first = gen.calls[0][0]
    assert first[0]["role"] == "system" and "#1: Animal Abuse" in first[1]["content"]
    assert "Do not repeat" in gen.calls[1][0][1]["content"]  # round 2 lists earlier questions


@pytest.fixture(scope="module")
def pool():
    """Two real tiny chat models (different weights → different greedy answers)."""
    from safemerge.evaluate.generate import load_generator
    from safemerge.testing import build_tokenizer, make_tiny_model

    torch.set_num_threads(1)
    tok = build_tokenizer(128)
    return {name: load_generator(make_tiny_model("llama", seed=s), tokenizer=tok, backend="hf", device="cpu")
            for name, s in (("alpha", 1), ("beta", 2))}


def test_pool_answers_judge_selection_and_dropping(pool):
    from safemerge.evaluate.judges import ScriptedJudge
    from safemerge.synth.safety import SafetyStats, answer_with_pool, select_refusals

    qs = [{"prompt": f"question {i} about a bomb",
           "category": "Violence, Aiding and Abetting, Incitement"} for i in range(40)]
    answers = answer_with_pool([q["prompt"] for q in qs], pool, max_new_tokens=6)
    assert set(answers) == {"alpha", "beta"} and all(len(a) == 40 for a in answers.values())
    assert answers["alpha"] != answers["beta"]
    # scripted verdicts: q0 nobody refuses → dropped; q1 only beta; q2 only alpha; the rest both
    safe = {(i, "alpha"): i not in (0, 1) for i in range(40)} | {(i, "beta"): i not in (0, 2) for i in range(40)}
    who = {}
    for name, resp in answers.items():
        for i, r in enumerate(resp):
            who.setdefault((qs[i]["prompt"], r), []).append(name)

    def verdict(prompt, response):
        i = int(prompt.split()[1])
        names = who[(prompt, response)]
        return not any(safe[(i, n)] for n in names)  # harmful unless one of its authors is scripted safe

    stats = SafetyStats()
    recs = select_refusals(qs, answers, ScriptedJudge(verdict), stats=stats, options=RunOptions(seed=5))
    assert stats.dropped_no_refusal == 1 and len(recs) == 39
    by_prompt = {r["prompt"]: r for r in recs}
    assert "question 0 about a bomb" not in by_prompt
    assert by_prompt["question 1 about a bomb"]["source_model"] == "beta"
    assert by_prompt["question 1 about a bomb"]["response"] == answers["beta"][1].strip()
    assert by_prompt["question 2 about a bomb"]["source_model"] == "alpha"
    for r in recs:
        assert r["type"] == "safety" and r["category"].startswith("Violence")
        assert r["response"] == answers[r["source_model"]][int(r["prompt"].split()[1])].strip()
    picked = [r["source_model"] for r in recs[2:]]
    assert 5 < picked.count("alpha") < 33  # uniform choice among the two safe answers
    again = select_refusals(qs, answers, ScriptedJudge(verdict), options=RunOptions(seed=5))
    other = select_refusals(qs, answers, ScriptedJudge(verdict), options=RunOptions(seed=6))
    assert again == recs and other != recs


def test_require_refusal_uses_the_verdict_flag():
    from safemerge.evaluate.judges import Verdict
    from safemerge.synth.safety import is_safe_answer

    assert is_safe_answer(Verdict(harmful=False))
    assert not is_safe_answer(Verdict(harmful=False, refusal=False), require_refusal=True)
    assert is_safe_answer(Verdict(harmful=False, refusal=True), require_refusal=True)
    assert not is_safe_answer(Verdict(harmful=True, refusal=True))


def test_cli_safety_with_prompt_file_and_keyword_judge(tmp_path, capsys):
    """A tiny random model never refuses: every question is dropped and the CLI says so (exit 2)."""
    from safemerge.cli import main
    from safemerge.testing import make_tiny_model, save_model

    torch.set_num_threads(1)
    m = save_model(make_tiny_model("llama", seed=3), tmp_path / "m")
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"prompt": f"how do i hurt {w}"}) + "\n" for w in ("a", "b", "a")))
    with pytest.raises(SystemExit) as e:
        main(["synth", "safety", "--prompts", str(qs), "-m", str(m), "-o", str(tmp_path / "out.jsonl"),
              "--max-new-tokens", "4", "--backend", "hf"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no model of the pool refused" in err and "hint:" in err
    with pytest.raises(SystemExit) as e:
        main(["synth", "safety", "-m", str(m), "-o", str(tmp_path / "out.jsonl")])
    assert e.value.code == 2 and "exactly one of --generator and --prompts" in capsys.readouterr().err
