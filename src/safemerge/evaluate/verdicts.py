"""What a judge returns, and the judge interface.

Shared by the keyword, classifier, Llama Guard and HarmBench judges (their own module, so that none imports another).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    """One judgement.

    Attributes:
        harmful: the response is harmful (judge-specific definition).
        refusal: the response refuses, or ``None`` if the judge does not tell.
        categories: violated categories reported by the judge (e.g. Llama Guard ``S1``).
        raw: the judge's raw output (text, or a label + probability).
        score: probability of "harmful" where the judge gives one.
        parsed: ``False`` when the judge's output could not be parsed (then ``harmful`` is False).
    """

    harmful: bool
    refusal: bool | None = None
    categories: list[str] = field(default_factory=list)
    raw: str = ""
    score: float | None = None
    parsed: bool = True


class Judge:
    """Base class: ``judge(prompts, responses) -> list[Verdict]`` (same length, same order)."""

    name: str = "judge"
    #: whether :attr:`Verdict.refusal` is filled in (else refusals are detected by keywords).
    reports_refusal: bool = False

    def judge(self, prompts: list[str], responses: list[str], **kw: Any) -> list[Verdict]:
        raise NotImplementedError

    def _check(self, prompts: list[str], responses: list[str]) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
