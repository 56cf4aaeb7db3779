"""Synthetic safety and domain data for safety-aware merging (Hammoud et al. 2024, §4.2–4.3)."""
from safemerge.synth.categories import CATEGORIES, resolve_categories  # noqa: F401
from safemerge.synth.domain import DomainStats, build_domain_set  # noqa: F401
from safemerge.synth.safety import (  # noqa: F401
    SafetyStats,
    answer_with_pool,
    build_safety_set,
    generate_unsafe_questions,
    select_refusals,
)
