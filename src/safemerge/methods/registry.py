"""The registry of merge methods: pure tensor functions, looked up by their YAML name.

A method is a function::

    fn(tensors: list[Tensor], base: Tensor | None, *, per_model: dict[str, list], params: dict,
       generator: torch.Generator | None) -> Tensor

* ``tensors`` — the float32 tensors of the non-base input models for ONE weight, in config order.
* ``base`` — the base model's float32 tensor (``None`` when the config has no base model).
* ``per_model`` — per-model parameter values, each a list aligned with ``tensors``
  (e.g. ``{"weight": [0.5, 0.5], "density": [0.7, 0.7]}``), defaults already filled in.
* ``params`` — global parameter values (``normalize``, ``lambda``, ``t`` …), defaults filled in.
* ``generator`` — a seeded RNG for stochastic methods (DARE, DELLA); deterministic methods ignore it.

Methods do no I/O and know nothing about configs or files; the engine, the safety layer and the
optimizer all call them the same way. Parameters are declared with :class:`Param` so the config
layer can validate names, types, ranges and required values before any tensor is read.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from safemerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """A method parameter.

    Attributes:
        name: the YAML name (mergekit's).
        default: default value, or :data:`REQUIRED`.
        per_model: read once per input model (``models[].parameters``) rather than globally.
        kind: ``float``, ``int`` or ``bool``.
        low, high: inclusive numeric bounds (``None`` = unbounded).
        low_open: the lower bound is exclusive (e.g. density ∈ (0, 1]).
        help: one-line description for docs and error hints.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def resolve(self, value: Any, where: str, missing: tuple[str, str | None]) -> Any:
        """``value`` checked, or the declared default when it is ``None`` (a default of ``None`` stays ``None``).

        A required parameter without a value raises ``ConfigError(*missing)`` (message, hint). The one
        default-and-check rule of the engine's plan and of :meth:`MergeMethod.call`.
        """
        if value is None:
            if self.required:
                raise ConfigError(*missing)
            value = self.default
        return None if value is None else self.check(value, where)

    def _error(self, where: str, problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{where}: parameter {self.name!r} {problem}", hint or self.help or None)

    def check(self, value: Any, where: str) -> Any:
        """Validate and coerce one value; raises :class:`ConfigError` naming ``where`` and the fix."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise self._error(where, f"must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise self._error(where, f"must be a number, got {value!r}") from None
            else:
                raise self._error(where, f"must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise self._error(where, f"must be finite, got {value!r}")
        if self.kind is int:
            if int(value) != value:
                raise self._error(where, f"must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        hi_bad = self.high is not None and value > self.high
        if lo_bad or hi_bad:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            rng = f"{'(' if self.low_open else '['}{lo}, {hi}]"
            raise self._error(where, f"= {value!r} is outside {rng}", self.help or f"use a value in {rng}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: YAML ``merge_method`` name.
        fn: the tensor function (see module docstring).
        params: declared parameters.
        base: whether a base model is ``required``, ``optional`` or unused (``none``).
        min_models / max_models: bounds on the number of non-base inputs.
        stochastic: uses the RNG (DARE, DELLA) — ``--seed`` makes it reproducible.
        reference: the paper (authors, year, equation) the function implements.
    """

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "none"] = "none"
    min_models: int = 1
    max_models: int | None = None
    stochastic: bool = False
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def call(self, tensors: list[torch.Tensor], base: torch.Tensor | None, *,
             per_model: Mapping[str, list] | None = None, params: Mapping[str, Any] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Run :attr:`fn` outside the engine, with declared defaults filled in and every value checked.

        The engine resolves parameters per tensor from a config (``engine/plan.py``); other callers
        (SafeMERGE's dense strategies, tests) use this.
        """
        per_model, params = per_model or {}, params or {}
        pm = {p.name: [p.resolve(v, f"{self.name}.{p.name}",
                                 (f"merge method {self.name!r} needs per-model parameter {p.name!r}", p.help or None))
                       for v in per_model.get(p.name) or [None] * len(tensors)]
              for p in self.per_model_params}
        gp = {p.name: p.resolve(params.get(p.name), f"{self.name}.{p.name}",
                                (f"merge method {self.name!r} needs parameter {p.name!r}", p.help or None))
              for p in self.global_params}
        return self.fn(tensors, base, per_model=pm, params=gp, generator=generator)


REGISTRY: dict[str, MergeMethod] = {}
"""Name → method; filled by :func:`register` (look methods up with :mod:`safemerge.methods.catalog`)."""


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (names are unique)."""
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


MethodFn = Callable[..., "torch.Tensor"]


def merge_method(
    name: str,
    *,
    params: tuple[Param, ...] = (),
    base: Literal["required", "optional", "none"] = "none",
    min_models: int = 1,
    max_models: int | None = None,
    stochastic: bool = False,
    reference: str = "",
    **extra: Any,
) -> Callable[[MethodFn], MethodFn]:
    """Declare and register a merge method beside its tensor function — one decorator, one place.

    In the spirit of mergekit's ``easy_define.merge_method``, but explicit: the parameters are
    :class:`Param` declarations (name, default, range, help) instead of type hints, and the
    function keeps the registry signature ``fn(tensors, base, *, per_model, params, generator)``
    (module docstring). The engine checks the arity and every parameter from this declaration
    before a tensor is read, and the registered function checks the arity and shapes of each call
    (the decorated name stays the plain function); ``extra`` holds engine hints (``elementwise``,
    ``base_in_tensors``, ``needs_tensor_name``, ``tie_break``); a method's two-pass row-block kernel, if it
    has one, is registered in :data:`safemerge.methods.streaming.TWO_PASS`.

    Example (see ``docs/architecture.md`` — "Adding a merge method")::

        @merge_method("nearswap", params=(Param("t", low=0.0),), base="required", min_models=1,
                      max_models=1, reference="alchemonaut 2024, NearSwap", elementwise=True)
        def nearswap_fn(tensors, base, *, per_model, params, generator=None):
            return nearswap(base, tensors[0], params["t"])
    """

    def declare(fn: MethodFn) -> MethodFn:
        @functools.wraps(fn)
        def checked(tensors: list, base_tensor: "torch.Tensor | None", **kw: Any) -> "torch.Tensor":
            from safemerge.methods._tensor import check_inputs  # imports torch; this module does not

            check_inputs(name, tensors, base_tensor, base_policy=base, min_models=min_models, max_models=max_models)
            return fn(tensors, base_tensor, **kw)

        register(MergeMethod(name=name, fn=checked, params=tuple(params), base=base, min_models=min_models,
                             max_models=max_models, stochastic=stochastic, reference=reference, extra=dict(extra)))
        return fn

    return declare
