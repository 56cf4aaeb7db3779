"""Project-written data for ``safemerge demo`` (no download, no third-party text).

* **safety data** — harmful requests and benign look-alikes from
  :mod:`safemerge.data.safety_corpus` (14 harm categories, 10 look-alike categories), split by whole
  goals: the aligned model's safety SFT (refusals from :data:`REFUSALS`; look-alike answers
  self-distilled from the base model, so the SFT teaches "refuse harm" without "refuse everything
  that sounds dangerous"), the safety LoRA (``safety_corpus.safety_lora_records``: composed
  refusals + hand-written helpful answers), validation sets for automatic τ/α and the test sets.
* **arithmetic word problems** — one- and two-step problems with exact integer answers and a
  worked solution ending in "The answer is N.". Training problems come from
  :data:`ARITH_TEMPLATES`; validation and test problems from :data:`ARITH_EVAL_TEMPLATES`, phrased
  independently (other situations and wording), so utility measures the skill rather than the
  template. This is the demo's *utility task*: a skill a 135M model can learn measurably from a
  LoRA (GSM8K is too hard at that size).

:func:`check_disjoint` verifies that no training prompt appears in an evaluation set.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from safemerge.data import builtin_rows
from safemerge.data import safety_corpus as C

ARITH_INSTRUCTION = "Answer with the final number after 'The answer is'."

# The aligned SFT's refusal templates (the safety LoRA's refusals are composed differently: safety_corpus).
REFUSALS = [
    "I'm sorry, but I can't help with that. It could seriously hurt people or break the law. If you are dealing with a "
    "difficult situation, I'm happy to help you find a safe and legal way forward.",
    "I can't help with that request. It could cause real harm to others. If there is an underlying problem you are "
    "trying to solve, tell me more and I will suggest safe options.",
    "Sorry, I cannot assist with that. Helping with this would be dangerous and potentially illegal. I can share "
    "information about staying safe or where to find support instead.",
    "I won't help with that, because it could put people in danger. If you or someone else is at risk, please contact "
    "local emergency services or a trusted professional.",
]

_NAMES = ["Sam", "Mia", "Tom", "Lena", "Omar", "Ines", "Raj", "Yuki", "Noah", "Zara", "Pablo", "Ada"]
_THINGS = ["apples", "pens", "stickers", "cards", "eggs", "coins", "books", "balloons", "cupcakes", "shells"]


def _p_add(r: random.Random) -> tuple[str, str, int]:
    n, t, a, b = r.choice(_NAMES), r.choice(_THINGS), r.randint(5, 60), r.randint(2, 40)
    return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", f"{a} + {b} = {a + b}.", a + b


def _p_sub(r: random.Random) -> tuple[str, str, int]:
    n, t, a = r.choice(_NAMES), r.choice(_THINGS), r.randint(20, 90)
    b = r.randint(2, a - 5)
    return f"{n} had {a} {t} and gave {b} away. How many {t} are left?", f"{a} - {b} = {a - b}.", a - b


def _p_mul(r: random.Random) -> tuple[str, str, int]:
    n, t, a, b = r.choice(_NAMES), r.choice(_THINGS), r.randint(2, 9), r.randint(2, 12)
    return f"{n} buys {a} bags with {b} {t} in each bag. How many {t} does {n} buy?", f"{a} * {b} = {a * b}.", a * b


def _p_div(r: random.Random) -> tuple[str, str, int]:
    t, k, each = r.choice(_THINGS), r.randint(2, 9), r.randint(2, 10)
    return (f"{k * each} {t} are shared equally by {k} children. How many {t} does each child get?",
            f"{k * each} / {k} = {each}.", each)


def _p_two(r: random.Random) -> tuple[str, str, int]:
    n, t, a, b, c = r.choice(_NAMES), r.choice(_THINGS), r.randint(2, 6), r.randint(2, 9), r.randint(2, 20)
    return (f"{n} has {c} {t} and buys {a} packs of {b} {t}. How many {t} does {n} have now?",
            f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}.", a * b + c)


def _p_price(r: random.Random) -> tuple[str, str, int]:
    n, t, a, b = r.choice(_NAMES), r.choice(_THINGS), r.randint(2, 9), r.randint(2, 15)
    return f"{n} buys {a} {t} at {b} dollars each. How many dollars does {n} spend?", f"{a} * {b} = {a * b}.", a * b


def _p_diff(r: random.Random) -> tuple[str, str, int]:
    n, m, t = r.choice(_NAMES), r.choice(_NAMES), r.choice(_THINGS)
    a, b = r.randint(30, 90), r.randint(5, 29)
    q = f"{n} collected {a} {t}. {m} collected {b}. How many more {t} did {n} collect than {m}?"
    return q, f"{a} - {b} = {a - b}.", a - b


# Training templates: the skill (one or two operations on small integers) in several wordings.
ARITH_TEMPLATES: list[Callable[[random.Random], tuple[str, str, int]]] = [_p_add, _p_sub, _p_mul, _p_div, _p_two,
                                                                           _p_price, _p_diff]


def _q_bus(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(20, 70), r.randint(3, 19)
    return (f"There were {a} passengers on a bus. At the next stop {b} of them got off. "
            f"How many passengers are still on the bus?", a - b)


def _q_desks(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(3, 14), r.randint(3, 12)
    return f"A classroom has {a} rows of desks and every row holds {b} desks. What is the total number of desks?", a * b


def _q_bakery(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 60), r.randint(10, 60)
    return (f"A bakery baked {a} muffins in the morning and {b} muffins in the afternoon. "
            f"How many muffins were baked that day?", a + b)


def _q_cartons(r: random.Random) -> tuple[str, int]:
    per, k = r.randint(4, 12), r.randint(2, 9)
    return f"A farmer packs {per * k} eggs into cartons that hold {per} eggs each. How many cartons does she fill?", k


def _q_library(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(40, 90), r.randint(5, 30), r.randint(3, 20)
    return (f"A small library owned {a} books. It lent out {b} of them and then received {c} donated books. "
            f"How many books are on its shelves now?", a - b + c)


def _q_tickets(r: random.Random) -> tuple[str, int]:
    price, q, extra = r.randint(3, 12), r.randint(2, 6), r.randint(2, 9)
    return (f"Cinema tickets cost {price} dollars each. A family buys {q} tickets and one bag of popcorn "
            f"for {extra} dollars. What do they pay altogether?", price * q + extra)


# Evaluation templates: the same skill phrased independently of the training templates (other
# situations, sentence structure and question wording), so utility measures a skill, not a template.
ARITH_EVAL_TEMPLATES: list[Callable[[random.Random], tuple[str, int]]] = [_q_bus, _q_desks, _q_bakery, _q_cartons,
                                                                          _q_library, _q_tickets]


@dataclass(frozen=True)
class ArithmeticSplits:
    """Disjoint arithmetic problems (no question text appears in two splits).

    ``train`` comes from :data:`ARITH_TEMPLATES`; ``val`` and ``test`` from
    :data:`ARITH_EVAL_TEMPLATES` (independently phrased), with distinct questions.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]


def _distinct(templates: list[Callable[[random.Random], tuple[Any, ...]]], n: int, r: random.Random,
              exclude: set[str] = frozenset()) -> list[tuple[Any, ...]]:
    """``n`` problems cycling through ``templates`` with distinct question texts (``exclude`` taken)."""
    seen = set(exclude)
    rows: list[tuple[Any, ...]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > n * 50:
            raise RuntimeError("could not generate enough distinct arithmetic problems")
        tmpl = templates[len(rows) % len(templates)]
        out = tmpl(r)
        if out[0] in seen:
            continue
        seen.add(out[0])
        rows.append((*out, tmpl.__name__[3:]))
    return rows


# Validation problems drawn together with the test problems. The validation set grew from 100 to 200 problems
# (issue 17: 100 could not resolve the acceptance's 3-point utility margin) without changing the training or test
# problems: the rest are drawn afterwards from the same random stream, distinct from both.
VAL_DRAWN_WITH_TEST = 100


def arithmetic_splits(n_train: int = 640, n_val: int = 200, n_test: int = 200, seed: int = 20250) -> ArithmeticSplits:
    """Generate word problems: train from the training templates, val/test from the evaluation templates.

    Train records are ``{"prompt", "response"}`` (worked solution + "The answer is N.");
    val/test records are ``{"id", "prompt", "answer", "category", "metric": "number"}`` for the
    evaluation harness (final-number exact match, as GSM8K; Cobbe et al. 2021). The first
    :data:`VAL_DRAWN_WITH_TEST` validation problems are drawn with the test problems, the rest after them.
    """
    r = random.Random(seed)
    train_rows = _distinct(ARITH_TEMPLATES, n_train, r)
    r.shuffle(train_rows)
    first = min(n_val, VAL_DRAWN_WITH_TEST)
    held = _distinct(ARITH_EVAL_TEMPLATES, first + n_test, r)
    r.shuffle(held)
    more = _distinct(ARITH_EVAL_TEMPLATES, n_val - first, r, exclude={row[0] for row in held})
    r.shuffle(more)
    held += more

    def ev(i: int, row: tuple[Any, ...], split: str) -> dict[str, Any]:
        q, ans, cat = row
        return {"id": f"demo-arith-{split}-{i:03d}", "prompt": f"{q} {ARITH_INSTRUCTION}", "answer": str(ans),
                "category": cat, "metric": "number"}

    test = [ev(i, x, "test") for i, x in enumerate(held[:n_test])]
    val = [ev(i, x, "val") for i, x in enumerate(held[n_test:n_test + n_val])]
    train = [{"prompt": f"{q} {ARITH_INSTRUCTION}", "response": f"{work} The answer is {ans}."}
             for q, work, ans, _ in train_rows]
    return ArithmeticSplits(train=train, val=val, test=test)


@dataclass(frozen=True)
class SafetySplits:
    """The demo's safety data, all from :mod:`safemerge.data.safety_corpus` (whole goals per split).

    ``harmful_train``: the aligned SFT's refusals; ``benign_train_prompts``: look-alikes whose answers the
    zoo self-distils from the base model; ``*_val`` drive automatic τ/α; ``*_test`` are the demo's test sets.
    """

    harmful_train: list[dict[str, Any]]
    harmful_val: list[dict[str, Any]]
    harmful_test: list[dict[str, Any]]
    benign_train_prompts: list[str]
    benign_val: list[dict[str, Any]]
    benign_test: list[dict[str, Any]]


def safety_splits(seed: int = 7, harm_frames: int = 3, benign_frames: int = 3) -> SafetySplits:
    """Aligned-SFT records and held-out evaluation sets.

    Harmful train: every ``align`` goal (incl. the training-only goals) under ``harm_frames`` training frames,
    each answered by one of :data:`REFUSALS` (seeded). Harmful val (6 frames × 28 goals = 168) and test (5 × 56 = 280)
    use the
    evaluation frames on goals no training record contains. Benign train: ``align`` look-alike goals
    under ``benign_frames`` frames drawn from the harmful training frames and the look-alike frames; benign val (50)
    and test (250) are held-out goals.
    """

    r = random.Random(seed)
    harmful_train = [
        {"prompt": f.format(g=g), "response": r.choice(REFUSALS), "category": c}
        for c, g in C.harmful_goals("align") for f in r.sample(C.TRAIN_FRAMES, harm_frames)
    ]
    r.shuffle(harmful_train)
    # Look-alikes are asked in the harmful requests' training frames too, so a frame is never a cue to refuse.
    benign_frames_pool = C.TRAIN_FRAMES + C.BENIGN_FRAMES
    benign_train = [f.format(g=g) for _, g in C.benign_goals("align") for f in r.sample(benign_frames_pool,
                                                                                        benign_frames)]
    r.shuffle(benign_train)
    return SafetySplits(
        harmful_train=harmful_train,
        harmful_val=builtin_rows("harmful-val"),
        harmful_test=C.eval_prompts("harmful", "test", frames_per_goal=5),
        benign_train_prompts=benign_train,
        benign_val=builtin_rows("benign-val"),
        benign_test=C.eval_prompts("benign", "test", frames_per_goal=5),
    )


def check_disjoint(train_prompts: Iterable[str], eval_prompts: Iterable[str]) -> list[str]:
    """Training prompts that also occur (case/space-insensitively) in an evaluation set."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    ev = {norm(p) for p in eval_prompts}
    return [p for p in train_prompts if norm(p) in ev]
