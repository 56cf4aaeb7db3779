"""Parameter resolution with mergekit's semantics: precedence, gradients and filters.

* Precedence (first found wins): the source's own ``parameters`` (``models[].parameters`` or
  ``slices[].sources[].parameters``) → the slice's ``parameters`` → top-level ``parameters``.
* A numeric list is a *gradient*: piecewise-linear in ``t = i/(n−1)`` over the ``n`` layers of
  the output slice (``t = 1`` for a one-layer slice; ``t = 0`` for non-layer tensors).
  A list of booleans/strings selects the step ``values[int(t·(n−1))]``.
* A list of ``{filter, value}`` entries is *conditional*: the first entry whose ``filter`` is a
  substring of the tensor name (or is absent / ``"*"``) gives the value.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from safemerge.config.models import ConditionalParameter


def evaluate_setting(tensor_name: str, setting: Any, t: float, validate: Callable[[Any], Any] = lambda v: v) -> Any:
    """Resolve one parameter setting for ``tensor_name`` at gradient position ``t``; ``None`` if no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, dict) and "value" in setting:
        setting = [ConditionalParameter.model_validate(setting)]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            pos = t * (len(values) - 1)
            i0 = int(pos)
            i1 = min(len(values) - 1, i0 + 1)
            frac = pos - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if isinstance(cond, dict):
                cond = ConditionalParameter.model_validate(cond)
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, validate)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Any] | None],
    *,
    tensor_name: str,
    t: float,
    validate: Callable[[Any], Any],
) -> Any:
    """First non-``None`` value of parameter ``name`` across ``scopes`` (highest precedence first)."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate_setting(tensor_name, scope[name], t, validate)
            if v is not None:
                return v
    return None
