"""synth domain: 3 random in-context examples, self-answering, dedupe, dropping copies (Hammoud et al. 2024, §4.3)."""
from __future__ import annotations

import json
import re

import pytest

from safemerge.options import RunOptions

SEEDS = [f"Which organelle makes protein number {i}?" for i in range(10)]


class EchoExpert:
    """Writes a question derived from its first in-context example, and answers 'ANSWER: <question>'.

    Behaviour by request number (mod 5): 0 → new question, 1 → copy of example 1 (must be dropped),
    2 → garbage (parse failure), 3 → the same question as the previous request (duplicate), 4 → new.
    """

    def __init__(self, tag: str):
        self.tag, self.n, self.last, self.seen_examples = tag, 0, None, []

    def generate(self, prompts, *, max_new_tokens=128, batch_size=None, stop=None, progress=True):
        out = []
        for p in prompts:
            if isinstance(p, str):  # answering its own question
                out.append(f"ANSWER by {self.tag}: {p}")
                continue
            examples = re.findall(r'Example \d: (\{.*\})', p[0]["content"])
            exs = [json.loads(e)["Question"] for e in examples]
            self.seen_examples.append(exs)
            k = self.n % 5
            self.n += 1
            if k == 1:
                out.append(json.dumps({"Question": exs[0]}))
            elif k == 2:
                out.append("I'd rather not")
            elif k == 3 and self.last:
                out.append(json.dumps({"Question": self.last}))
            else:
                self.last = f"{self.tag} asks about {exs[0]} ({self.n})"
                out.append(f'Here you go: {{"Question": "{self.last}"}}')
        return out


def test_domain_pipeline():
    from safemerge.synth.domain import DomainStats, build_domain_set

    experts = {"bio": EchoExpert("bio"), "med": EchoExpert("med")}
    stats = DomainStats()
    recs = build_domain_set(experts, SEEDS, "biology", 10, stats=stats, options=RunOptions(seed=1))
    # per expert 5 requests: 2 kept (k=0,4), 1 copy, 1 parse failure, 1 duplicate
    assert stats.requests == 10 and stats.copies_of_examples == 2
    assert stats.parse_failures == 2 and stats.duplicates == 2
    assert len(recs) == 4 and stats.by_model == {"bio": 2, "med": 2}
    for r in recs:
        assert r["type"] == "domain" and r["category"] == "biology"
        assert r["response"] == f"ANSWER by {r['source_model']}: {r['prompt']}"  # each expert answers its own questions
        assert r["prompt"] not in SEEDS
    for ex in experts["bio"].seen_examples:
        assert len(ex) == 3 and len(set(ex)) == 3 and set(ex) <= set(SEEDS)
    assert experts["bio"].seen_examples != experts["med"].seen_examples  # one RNG stream per expert
    again = build_domain_set({"bio": EchoExpert("bio"), "med": EchoExpert("med")}, SEEDS, "biology", 10,
                             options=RunOptions(seed=1))
    assert again == recs


def test_domain_needs_three_seed_questions():
    from safemerge.errors import SafemergeError
    from safemerge.synth.domain import build_domain_set

    with pytest.raises(SafemergeError, match="at least 3"):
        build_domain_set({"x": EchoExpert("x")}, SEEDS[:2], "biology", 4)


def test_seed_file_formats(tmp_path):
    from safemerge.synth.common import load_questions

    (tmp_path / "a.txt").write_text("q1?\n\nq2?\n")
    (tmp_path / "b.jsonl").write_text('{"question": "q3?"}\n{"instruction": "q4?"}\n')
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"Question": "q5?"}, "q6?"]}))
    assert [q["prompt"] for q in load_questions(str(tmp_path / "a.txt"))] == ["q1?", "q2?"]
    assert [q["prompt"] for q in load_questions(str(tmp_path / "b.jsonl"))] == ["q3?", "q4?"]
    assert [q["prompt"] for q in load_questions(str(tmp_path / "c.json"))] == ["q5?", "q6?"]


def test_write_jsonl_refuses_existing_file(tmp_path):
    from safemerge.errors import SafemergeError
    from safemerge.synth.common import write_jsonl

    p = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "a"}])
    with pytest.raises(SafemergeError, match="already exists"):
        write_jsonl(p, [{"prompt": "b"}])
    write_jsonl(p, [{"prompt": "b"}], force=True)
    assert json.loads(p.read_text()) == {"prompt": "b"}
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]
