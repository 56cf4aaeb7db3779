"""Merge configuration: pydantic models of mergekit's YAML plus parameter resolution."""
from safemerge.config.models import MergeConfig, load_config  # noqa: F401
from safemerge.config.params import evaluate_setting  # noqa: F401
