"""What the SafeMERGE and SafeLoRA writers report: per-layer scores and decisions, as written to ``safemerge.json``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemerge.safety.selection import LayerScore
from safemerge.safety.settings import SafeMergeSettings


@dataclass
class SafeMergeResult:
    """What :func:`safemerge_adapters` wrote.

    Attributes:
        out: output directory.
        output: ``"adapter"`` or ``"model"``.
        scores: one :class:`LayerScore` per fine-tuned module (``merged`` = ρ < τ, in a block ≥ ``min_layer``).
        safety_gain, min_layer: the extensions of :mod:`safemerge.methods.safety_params` (1 and 0: the paper).
        reconstruction_error: module → ‖ΔW − B A‖_F/‖ΔW‖_F for SVD-truncated layers.
        ignored_safety_modules: safety-adapter modules the fine-tuned update does not touch, and the
            safety adapter's non-LoRA parts (never applied).
        carried_over: the fine-tuned adapter's non-LoRA parts (modules_to_save, biases, trainable
            tokens), written unchanged: tensor name → what it is.
    """

    out: Path
    output: str
    scores: list[LayerScore]
    tau: float
    alpha: float
    strategy: str
    compat: str | None = None
    seed: int | None = None
    density: float | None = None
    safety_gain: float = 1.0
    min_layer: int = 0
    reconstruction_error: dict[str, float] = field(default_factory=dict)
    ignored_safety_modules: list[str] = field(default_factory=list)
    carried_over: dict[str, str] = field(default_factory=dict)
    evaluation: Any = None

    @classmethod
    def of(cls, out: Path, output: str, scores: list[LayerScore], settings: SafeMergeSettings, *, seed: int | None,
           ignored_safety_modules: list[str], carried_over: dict[str, str]) -> SafeMergeResult:
        """The result of a merge with ``settings`` (``density`` recorded for the DARE/TIES strategies only)."""
        return cls(out=out, output=output, scores=scores, tau=settings.tau, alpha=settings.alpha,
                   strategy=settings.strategy, compat=settings.compat, seed=seed,
                   density=settings.density if settings.strategy != "linear" else None,
                   safety_gain=settings.safety_gain, min_layer=settings.min_layer,
                   ignored_safety_modules=ignored_safety_modules, carried_over=carried_over)

    def _svd_error(self, module: str) -> dict[str, float]:
        err = self.reconstruction_error.get(module)
        return {} if err is None else {"reconstruction_error": err}

    @property
    def merged(self) -> list[str]:
        return [s.module for s in self.scores if s.merged]

    def extensions(self) -> dict[str, float | int]:
        """The non-default extensions used (``safety_gain`` ≠ 1, ``min_layer`` > 0); empty for the paper's rule."""
        ext: dict[str, float | int] = {}
        if self.safety_gain != 1.0:
            ext["safety_gain"] = self.safety_gain
        if self.min_layer > 0:
            ext["min_layer"] = self.min_layer
        return ext

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "safemerge",
            "output": self.output,
            "tau": self.tau,
            "alpha": self.alpha,
            "strategy": self.strategy,
            "compat": self.compat,
            "seed": self.seed,
            "density": self.density,
            **self.extensions(),
            "merged": len(self.merged),
            "layers": [s.to_dict() | self._svd_error(s.module) for s in self.scores],
            "ignored_safety_modules": self.ignored_safety_modules,
            "carried_over": self.carried_over,
        }


@dataclass
class SafeLoRAResult:
    """What :func:`safelora` wrote: scores (``merged`` = projected), mode and threshold used."""

    out: Path
    output: str
    scores: list[LayerScore]
    mode: str
    tau: float
    num_layers: int | None = None
    carried_over: dict[str, str] = field(default_factory=dict)

    @property
    def projected(self) -> list[str]:
        return [s.module for s in self.scores if s.merged]

    def to_dict(self) -> dict[str, Any]:
        return {"method": "safelora", "output": self.output, "mode": self.mode, "tau": self.tau,
                "num_layers": self.num_layers, "projected": len(self.projected),
                "layers": [s.to_dict() for s in self.scores], "carried_over": self.carried_over}
