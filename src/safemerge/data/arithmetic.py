"""Arithmetic word problems with exact integer answers, generated deterministically.

Each problem is built from a template and seeded random integers, and its answer is computed by
the same code, so the set has no labelling errors. Problems take one to three steps (like the
easy end of GSM8K, Cobbe et al. 2021) and are scored by final-number exact match.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jin", "Kemal", "Lea"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def _add_sub(r: random.Random) -> tuple[str, int]:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b, c = r.randint(10, 60), r.randint(2, 30), r.randint(1, 9)
    return (f"{n} has {a} {item}. {n} buys {b} more and then gives away {c}. "
            f"How many {item} does {n} have now?", a + b - c)


def _multiply(r: random.Random) -> tuple[str, int]:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    boxes, per = r.randint(2, 12), r.randint(3, 15)
    return f"{n} has {boxes} boxes with {per} {item} in each box. How many {item} are there in total?", boxes * per


def _price(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    qty, price, paid_extra = r.randint(2, 9), r.randint(2, 20), r.randint(1, 20)
    total = qty * price
    paid = total + paid_extra
    return (f"{n} buys {qty} tickets that cost ${price} each and pays with ${paid}. "
            f"How many dollars of change does {n} get?", paid - total)


def _share(r: random.Random) -> tuple[str, int]:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    friends, each = r.randint(2, 8), r.randint(2, 12)
    question = (f"{n} shares {friends * each} {item} equally among {friends} friends. "
                f"How many {item} does each friend get?")
    return question, each


def _time(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    days, minutes, extra = r.randint(3, 7), r.randint(10, 45), r.randint(5, 30)
    return (f"{n} practises piano for {minutes} minutes a day for {days} days, and then for {extra} more minutes "
            f"on the weekend. How many minutes does {n} practise in total?", days * minutes + extra)


def _two_step(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    rows, cols = r.randint(3, 9), r.randint(3, 9)
    removed = r.randint(1, cols - 1)
    return (f"A garden has {rows} rows of {cols} tulips. {n} picks {removed} tulips from every row. "
            f"How many tulips are left in the garden?", rows * (cols - removed))


_TEMPLATES: list[Callable[[random.Random], tuple[str, int]]] = [_add_sub, _multiply, _price, _share, _time, _two_step]


def arithmetic_problems(n: int = 60, seed: int = 1234) -> list[dict[str, Any]]:
    """``n`` word problems (cycling through the templates) with their exact integer answers.

    Returns rows with ``id``, ``prompt`` (problem + an instruction to end with the number),
    ``question``, ``answer`` (a string integer), ``category`` (the template) and ``metric="number"``.
    Same ``n`` and ``seed`` ⇒ identical problems.
    """
    r = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        tmpl = _TEMPLATES[i % len(_TEMPLATES)]
        question, answer = tmpl(r)
        rows.append({
            "id": f"arith-{i:03d}",
            "question": question,
            "prompt": f"{question} Answer with the final number after 'The answer is'.",
            "answer": str(answer),
            "category": tmpl.__name__.lstrip("_"),
            "metric": "number",
        })
    return rows
