"""The streaming merge engine: plan output tensors, then read → merge → write one tensor at a time."""
from safemerge.engine.plan import MergePlan, TensorJob, plan_merge  # noqa: F401
from safemerge.engine.run import execute_plan, merge_in_memory  # noqa: F401
