"""The 14 BeaverTails-style harm categories used to write unsafe questions.

Hammoud et al. 2024 ("One bad model spoils the bunch", arXiv 2406.14563, §4.2 and App. A.2)
prompt an uncensored generator once per category ("Your topic is #k"); the list is the
BeaverTails taxonomy (Ji et al. 2023).
"""
from __future__ import annotations

from safemerge.errors import SafemergeError

CATEGORIES: tuple[str, ...] = (
    "Animal Abuse",
    "Child Abuse",
    "Controversial Topics, Politics",
    "Discrimination, Stereotype, Injustice",
    "Drug Abuse, Weapons, Banned Substance",
    "Financial Crime, Property Crime, Theft",
    "Hate Speech, Offensive Language",
    "Misinformation Regarding ethics, laws, and safety",
    "Non-Violent Unethical Behavior",
    "Privacy Violation",
    "Self-Harm",
    "Sexually Explicit, Adult Content",
    "Terrorism, Organized Crime",
    "Violence, Aiding and Abetting, Incitement",
)


def resolve_categories(names: list[str] | None) -> list[str]:
    """Map user-given names or 1-based numbers to categories (``None`` → all 14).

    Matching is case-insensitive on the full name or any comma-separated part of it
    (``"self-harm"``, ``"privacy violation"``, ``"11"``).
    """

    if not names:
        return list(CATEGORIES)
    out: list[str] = []
    for raw in names:
        key = raw.strip().lower()
        hit = None
        if key.isdigit() and 1 <= int(key) <= len(CATEGORIES):
            hit = CATEGORIES[int(key) - 1]
        else:
            for cat in CATEGORIES:
                parts = [cat.lower()] + [p.strip().lower() for p in cat.split(",")]
                if key in parts:
                    hit = cat
                    break
        if hit is None:
            raise SafemergeError(
                f"unknown harm category {raw!r}",
                "use a number 1-14 or a name such as 'Self-Harm' (see `safemerge synth safety --help`)",
            )
        if hit not in out:
            out.append(hit)
    return out
