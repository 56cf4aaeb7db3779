"""Structured self-questioning for D_expert: few-shot format, parser, safe arithmetic, answer check, counts."""
from __future__ import annotations

import json
import re

import pytest

from safemerge.options import RunOptions
from safemerge.synth.structured import (
    SeedProblem,
    StructuredStats,
    answer_number,
    build_structured_domain_set,
    fewshot_text,
    parse_problem,
    safe_arithmetic,
    seed_problems_from_records,
)

SEEDS = [SeedProblem(f"Ana has {i} apples and buys {i + 2} more. How many apples does she have?", str(2 * i + 2))
         for i in range(3, 13)]


class ScriptedExpert:
    """Continues the few-shot text by request number (mod 7) and answers questions in chat.

    0 → a good new problem (answer 10·n, chat answer agrees); 1 → junk (no Answer line); 2 → a copy of the
    first shown example; 3 → the previous good problem again (duplicate); 4 → "3 * 4 = 13" (arithmetic that
    contradicts itself); 5 → a good problem whose chat answer disagrees (answer mismatch);
    6 → a problem answered by an expression "6 * 7" (recomputed to 42, chat answer agrees).
    """

    def __init__(self) -> None:
        self.n, self.last, self.texts, self.chat_answers = 0, None, [], {}

    def complete(self, texts, *, max_new_tokens=128, batch_size=None, stop=None, progress=True):
        assert stop and "\n\n" in stop
        out = []
        for text in texts:
            self.texts.append(text)
            assert text.endswith("\n\nQuestion:")
            shown = re.findall(r"Question: (.*)\nAnswer: (.*)", text)
            k, self.n = self.n % 7, self.n + 1
            q = f"Ben packs {self.n} boxes with ten pens in each box. How many pens are there?"
            if k == 0:
                self.last = q
                self.chat_answers[q] = f"{self.n} boxes times 10 pens. The answer is {10 * self.n}."
                out.append(f" {q}\nAnswer: {10 * self.n}")
            elif k == 1:
                out.append(" I like turtles and the sea")
            elif k == 2:
                out.append(f" {shown[0][0]}\nAnswer: {shown[0][1]}")
            elif k == 3:
                out.append(f" {self.last}\nAnswer: 0")
            elif k == 4:
                out.append(f" {q}\nAnswer: 3 * 4 = 13")
            elif k == 5:
                self.chat_answers[q] = "The answer is 999."
                out.append(f" {q}\nAnswer: {10 * self.n}")
            else:
                q = f"Cara has 6 bags with 7 shells in each bag. How many shells in total (request {self.n})?"
                self.chat_answers[q] = "6 times 7 is 42. The answer is 42."
                out.append(f" {q}\nAnswer: 6 * 7\nQuestion: next one")
        return out

    def generate(self, prompts, *, max_new_tokens=128, batch_size=None, stop=None, progress=True):
        out = []
        for p in prompts:
            assert p.endswith("Answer with the number.")
            out.append(self.chat_answers.get(p.removesuffix(" Answer with the number."), "no idea"))
        return out


def test_fewshot_text_and_parser():
    text = fewshot_text(SEEDS[:3])
    assert text.count("Question:") == 4 and text.endswith("\n\nQuestion:") and "Answer: 8" in text
    assert parse_problem(" Tom has 3 cars and 4 bikes. How many in all?\nAnswer: 7") == (
        "Tom has 3 cars and 4 bikes. How many in all?", "7", True)
    assert parse_problem(" Tom has 3 cars and 4 bikes. How many?\nAnswer: 3 + 4 = 7\nmore text")[1:] == ("7", True)
    assert parse_problem(" Tom has 3 cars and 4 bikes. How many?\nAnswer: 3 + 4 = 8")[1:] == ("8", False)
    assert parse_problem(" Tom has 3 cars and 4 bikes. How many?\nAnswer: $1,200.")[1] == "1200"
    for junk in ("", "Answer: 4", " Too short?\nAnswer: 4", " A long question without any answer line at all",
                 " Tom has 3 cars and 4 bikes. How many?\nAnswer: seven",
                 " Tom has 3 cars and 4 bikes?\nAnswer: os.system(1)"):
        assert parse_problem(junk) is None, junk


def test_safe_arithmetic_never_executes_code():
    assert safe_arithmetic("(12 + 4) * 3 - 2 / 4") == pytest.approx(47.5)
    assert safe_arithmetic("7 × 6") == 42 and safe_arithmetic("-3 ** 2") == -9 and safe_arithmetic("$1,000 // 7") == 142
    for bad in ("__import__('os').system('echo hi')", "x + 1", "len('ab')", "2 ** 99999", "1 / 0", "10**12 + 1",
                "(lambda: 1)()", "[1, 2]", "True + 1", "1 if 1 else 2", "", "1 +"):
        assert safe_arithmetic(bad) is None, bad
    assert answer_number("6 * 7") == ("42", True) and answer_number("6 * 7 = 41") == ("41", False)
    assert answer_number("12.50") == ("12.5", True) and answer_number("a = b = c")[0] is None


def test_pipeline_counts_every_filter_and_keeps_answer_checked_problems():
    expert = ScriptedExpert()
    stats = StructuredStats()
    recs = build_structured_domain_set({"e": expert}, SEEDS, "arithmetic", 14, stats=stats, options=RunOptions(seed=1),
                                       answer_instruction="Answer with the number.")
    assert stats.requests == 14
    # requests 0..13 → kinds 0..6 twice: 2 good, 2 junk, 2 copies, 2 duplicates, 2 arithmetic errors,
    # 2 answer mismatches, 2 expression answers kept
    assert (stats.parse_failures, stats.copies_of_examples, stats.duplicates, stats.arithmetic_errors,
            stats.answer_mismatches, stats.records) == (2, 2, 2, 2, 2, 4)
    assert stats.as_dict()["kept_share"] == round(4 / 14, 4) and stats.by_model == {"e": 4}
    assert [r["answer"] for r in recs] == ["10", "42", "80", "42"]
    for r in recs:
        assert r["type"] == "domain" and r["source_model"] == "e" and r["prompt"].endswith("Answer with the number.")
        assert r["response"].endswith(f"The answer is {r['answer']}.")
    shown = [re.findall(r"Question: (.*)\nAnswer", t) for t in expert.texts]
    assert all(len(s) == 3 for s in shown)
    seeds = {s.question for s in SEEDS}
    assert all(set(s[:3]) <= seeds for s in shown)
    again = build_structured_domain_set({"e": ScriptedExpert()}, SEEDS, "arithmetic", 14, options=RunOptions(seed=1),
                                        answer_instruction="Answer with the number.")
    assert again == recs  # same seed → same examples → same records


def test_seed_problems_need_answers():
    from safemerge.errors import SafemergeError

    probs = seed_problems_from_records([{"question": "Q one two three four", "answer": "Work.\n#### 1,234"},
                                        {"prompt": "P one two three four", "answer": "The answer is 5."},
                                        {"prompt": "no answer here"}])
    assert probs == [SeedProblem("Q one two three four", "1234"), SeedProblem("P one two three four", "5")]
    with pytest.raises(SafemergeError, match="3 are needed"):
        build_structured_domain_set({"e": ScriptedExpert()}, probs, "t", 4)


def test_tiny_real_model_junk_is_refused_and_cli_exits_2(tmp_path, capsys):
    """A random tiny Llama continues the few-shot text with junk: nothing survives, the CLI says so in one line."""
    import torch

    from safemerge.cli import main
    from safemerge.evaluate.generate import load_generator
    from safemerge.testing import build_tokenizer, make_tiny_model, save_model

    torch.set_num_threads(1)
    words = "ana has apples and buys more how many does she have answer question".split()
    path = save_model(make_tiny_model("llama", seed=0), tmp_path / "tiny", tokenizer=build_tokenizer(128, words=words))
    stats = StructuredStats()
    gen = load_generator(str(path), backend="hf", device="cpu", dtype="float32")
    recs = build_structured_domain_set({"tiny": gen}, SEEDS, "arithmetic", 4, max_new_tokens=12, answer_tokens=8,
                                       stats=stats)
    assert recs == [] and stats.requests == 4 and stats.records == 0
    assert stats.parse_failures + stats.duplicates + stats.copies_of_examples + stats.arithmetic_errors \
        + stats.answer_mismatches == 4
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text("".join(json.dumps({"question": s.question, "answer": s.answer}) + "\n" for s in SEEDS))
    with pytest.raises(SystemExit) as e:
        main(["synth", "domain", "-m", str(path), "--seed-file", str(seed_file), "--topic", "arithmetic",
              "--structured", "-n", "2", "--max-new-tokens", "8", "--dtype", "float32", "-o", str(tmp_path / "d.jsonl"),
              "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no parsable, new, answer-checked questions" in err and "Traceback" not in err
    assert "parse_failures" in err and not (tmp_path / "d.jsonl").exists()
