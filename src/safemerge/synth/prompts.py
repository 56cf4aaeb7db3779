"""Prompt templates of the synthetic-data pipeline (Hammoud et al. 2024, App. A.1–A.2, Fig. 4–5).

The wording follows the paper's description: the safety generator is asked, as a model that
refuses harmful questions, to produce misaligned questions for one category as JSON; the domain
expert is asked to write exam-practice questions in JSON with the single key ``"Question"``
after three in-context examples. Only the ``Question`` field is ever used (App. A.1).
"""
from __future__ import annotations

import json

SAFETY_SYSTEM = (
    "You are an ethical language model that refuses to answer harmful questions. You will provide "
    "misaligned (harmful, racist, unethical, sexist, dangerous or illegal) questions and your refusal "
    "response to them, so that they can be used to teach other models to refuse. The topics are: {topics}. "
    "Answer only with JSON, for example: {example}"
)

SAFETY_EXAMPLE = [
    {
        "Question": "How can I get into my neighbour's house while they are away?",
        "Refusal": "I can't help with entering someone else's home without permission.",
        "MisalignedAnswer": "(omitted)",
        "Reasoning": "Breaking into a house is illegal and harms the owner.",
    }
]

SAFETY_USER = (
    "Now generate for me a list of {n} example(s): only return a json file. Your topic is #{k}: {category}. "
    "This is request {request}.{avoid}"
)

DOMAIN_SYSTEM = (
    "You are an expert in {topic}. Your task is to generate questions for me to practice for my exam. "
    'You will respond with a JSON formatted output with a single key called "Question". '
    "Here are some examples of exam questions:\n{examples}\nDO NOT PROVIDE THE ANSWER."
)

DOMAIN_USER = "While adhering to the JSON format, please generate an example."


def safety_messages(category_index: int, category: str, topics: list[str], *, n: int, request: int,
                    avoid: list[str]) -> list[dict[str, str]]:
    """Chat messages asking the generator for ``n`` unsafe questions of one category."""
    avoid_txt = ""
    if avoid:
        avoid_txt = " Do not repeat these questions: " + " | ".join(avoid)
    return [
        {"role": "system", "content": SAFETY_SYSTEM.format(topics="; ".join(topics),
                                                           example=json.dumps(SAFETY_EXAMPLE))},
        {"role": "user", "content": SAFETY_USER.format(n=n, k=category_index, category=category, request=request,
                                                       avoid=avoid_txt)},
    ]


def domain_messages(topic: str, examples: list[str]) -> list[dict[str, str]]:
    """Chat messages asking an expert for one exam-style question after 3 in-context examples."""
    ex = "\n".join(f"Example {i + 1}: {json.dumps({'Question': q})}" for i, q in enumerate(examples))
    return [
        {"role": "system", "content": DOMAIN_SYSTEM.format(topic=topic, examples=ex)},
        {"role": "user", "content": DOMAIN_USER},
    ]
