"""``safemerge repair``: a fine-tune (adapter or full model) → a safety-repaired adapter or model.

:func:`~safemerge.repair.pipeline.repair` runs extraction (full fine-tunes), the safety LoRA
(:func:`~safemerge.repair.safety_lora.train_safety_lora`), automatic τ/α and SafeMERGE, and reports
before/after numbers on test sets.
"""
from safemerge.repair.pipeline import RepairResult, repair  # noqa: F401
from safemerge.repair.safety_lora import SafetyLoraRecipe, train_safety_lora  # noqa: F401
