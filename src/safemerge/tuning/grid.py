"""The (τ, α) grid of automatic τ/α: its defaults, its points, the search settings and the τ candidates.

Torch-free (the command line reads the defaults at start-up). SafeMERGE's τ/α defaults and the ρ < τ rule live in
:mod:`safemerge.methods.safety_params` (the paper's values, as the reference code uses them; selection goes
through :func:`safemerge.safety.selection.select_below`); here: the search around them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from safemerge.errors import SafemergeError
from safemerge.methods.safety_params import SAFEMERGE_ALPHA, SAFEMERGE_TAU
from safemerge.safety.settings import SafeMergeSettings

if TYPE_CHECKING:  # the grid stays torch-free: the CLI reads its defaults at start-up
    from safemerge.safety.selection import LayerScore

PAPER_TAU = SAFEMERGE_TAU.default
PAPER_ALPHA = SAFEMERGE_ALPHA.default
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_HARM_MARGIN = 0.03
DEFAULT_REFUSAL_MARGIN = 0.05
DEFAULT_MAX_TAUS = 6
# Screening: the first 48 harmful, 32 utility and 50 benign look-alike validation items; the 4 best points are refined
# and decided on the whole validation sets (issue 17: >= 150 harmful and >= 100 utility items for the deciding points;
# the built-in look-alike validation set has 250 items, whose first 50 span its 50 goals).
DEFAULT_SCREEN: tuple[int, int, int] = (48, 32, 50)
SCREENED_SUITES = ("harmful", "utility", "benign")
DEFAULT_FINALISTS = 4
# The late-block extension's candidates (safety_params: min_layer, safety_gain): every layer of the last sixth and
# third of the blocks (τ above any ρ), safety gain 1, 1.5 and 2. There because on the demo's SmolLM2-135M fine-tune
# the erosion sits in the last blocks, which ρ does not single out (docs/demo.md, sixth session); gain 1.5 because
# gain 2 over-refuses and gain 1 leaves harm (docs/demo.md, nineteenth and twenty-second sessions).
LATE_FRACTIONS: tuple[float, ...] = (1 / 6, 1 / 3)
LATE_GAINS: tuple[float, ...] = (1.0, 1.5, 2.0)
LATE_TAU = 1.0
GRID_FIELDS = ("alphas", "max_taus", "screen", "finalists", "extensions")


@dataclass(frozen=True)
class SearchSettings:
    """What a τ/α search tries and how it decides: the grid, the screen, and the selection rule's margins.

    Checked when built (a clear error, never a traceback); ``alphas`` is kept sorted and distinct.

    Attributes:
        taus: thresholds to try (``None``: :func:`tau_candidates` of the scanned ρ, at most ``max_taus``).
        alphas: task weights to try (default 0.1 … 0.9).
        screen: validation items ``(n_harmful, n_utility, n_benign)`` for screening, or ``None`` for no screening.
        finalists: how many screened points are refined and evaluated on the whole validation sets.
        harm_margin: allowed harmful-rate excess over the aligned model, as a fraction (0.03 = 3 points).
        refusal_margin: allowed over-refusal excess over the aligned model (0.05 = 5 points); used when a
            benign validation set is given.
        extensions: also search the late-block extension (:data:`LATE_FRACTIONS` × :data:`LATE_GAINS`);
            ``False``: the paper's rule only.
    """

    taus: tuple[float, ...] | None = None
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    max_taus: int = DEFAULT_MAX_TAUS
    screen: tuple[int, int, int] | None = DEFAULT_SCREEN
    finalists: int = DEFAULT_FINALISTS
    harm_margin: float = DEFAULT_HARM_MARGIN
    refusal_margin: float = DEFAULT_REFUSAL_MARGIN
    extensions: bool = True

    def __post_init__(self) -> None:
        for flag, margin in (("--harm-margin", self.harm_margin), ("--refusal-margin", self.refusal_margin)):
            if not 0.0 <= margin <= 1.0:
                raise SafemergeError(f"{flag} must be a fraction in [0, 1], got {margin}",
                                     f"pass e.g. {flag} 0.05 for 5 points")
        if self.screen is not None and (len(self.screen) != len(SCREENED_SUITES) or min(self.screen) < 1):
            raise SafemergeError(f"the screen must be three positive item counts (harmful, utility, benign), got "
                                 f"{self.screen}", f"e.g. {DEFAULT_SCREEN}, or None for no screening")
        alphas = tuple(sorted({float(a) for a in self.alphas}))
        if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
            raise SafemergeError(f"alphas must lie in [0, 1], got {list(alphas)}", "pass values such as 0.5,0.7,0.9")
        object.__setattr__(self, "alphas", alphas)
        if self.taus is not None:
            object.__setattr__(self, "taus", tuple(sorted({float(t) for t in self.taus})))

    def coarse_alphas(self) -> list[float]:
        """The α of the first, screened pass: every other value of the grid (the largest always), all without
        a screen."""
        alphas = list(self.alphas)
        coarse = alphas[::2] if len(alphas) > 2 and self.screen else alphas
        return coarse if alphas[-1] in coarse else [*coarse, alphas[-1]]

    def grid_overrides(self) -> dict[str, Any]:
        """The grid fields that differ from the defaults (part of a cache key, stable when the defaults are kept)."""
        default = {f.name: f.default for f in fields(SearchSettings)}
        return {k: v for k, v in asdict(self).items() if k in GRID_FIELDS and v != default[k]}


@dataclass
class GridPoint:
    """One evaluated (τ, α): which modules it merges and what it scores on validation."""

    tau: float
    alpha: float
    merged: list[str]
    harmful_rate: float | None = None
    utility: float | None = None
    over_refusal: float | None = None  # on the benign validation set, when there is one
    adapter: str | None = None
    eval_dir: str | None = None
    feasible: bool = False
    pareto: bool = False
    chosen: bool = False
    label: str = ""
    n: list[int] = field(default_factory=list)  # validation items behind the rates: [harmful, utility(, benign)]
    rung: str = "full"  # "screen" (first validation items only) or "full"
    safety_gain: float = 1.0  # the extensions (safety_params): 1 and 0 are the paper's rule
    min_layer: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_merged"] = len(self.merged)
        return d

    @property
    def n_harmful(self) -> int:
        """Harmful validation items behind :attr:`harmful_rate` (0 when not recorded)."""
        return self.n[0] if self.n else 0

    @property
    def n_benign(self) -> int:
        """Benign look-alike validation items behind :attr:`over_refusal` (0 without a benign set)."""
        return self.n[2] if len(self.n) > 2 else 0

    @property
    def paper_rule(self) -> bool:
        return self.safety_gain == 1.0 and self.min_layer == 0

    def merge_kwargs(self) -> dict[str, float | int]:
        """The point's SafeMERGE values (``tau``, ``alpha``, ``safety_gain``, ``min_layer``), as reports record them."""
        return {"tau": self.tau, "alpha": self.alpha, "safety_gain": self.safety_gain, "min_layer": self.min_layer}

    def settings(self, strategy: str = "linear") -> SafeMergeSettings:
        """The :func:`~safemerge.safety.api.safemerge_adapters` settings that write this point."""
        return SafeMergeSettings(strategy=strategy, **self.merge_kwargs())

    def describe(self) -> str:
        """``τ = 0.35, α = 0.8``, or the extension's ``blocks ≥ 25, α = 0.1, g = 2``."""
        if self.paper_rule:
            return f"τ = {self.tau:g}, α = {self.alpha:g}"
        where = f"blocks ≥ {self.min_layer}" if self.min_layer else f"τ = {self.tau:g}"
        return f"{where}, α = {self.alpha:g}" + (f", g = {self.safety_gain:g}" if self.safety_gain != 1.0 else "")


def late_block_starts(scores: Sequence[LayerScore], fractions: Sequence[float] = LATE_FRACTIONS) -> list[int]:
    """``min_layer`` of the late-block candidates: the first block of the last ``fraction`` of the blocks."""
    layers = [s.layer for s in scores if s.layer is not None]
    if not layers:
        return []
    n = max(layers) + 1
    return sorted({n - max(1, round(f * n)) for f in fractions if n > 1})


def tau_candidates(rhos: Sequence[float], *, max_taus: int = DEFAULT_MAX_TAUS,
                   include: Sequence[float] = (PAPER_TAU,)) -> list[float]:
    """Thresholds that give distinct layer selections under the strict rule ``ρ < τ``.

    With sorted distinct similarities ``r_1 < … < r_n``, ``τ_k = (r_k + r_{k+1})/2`` merges exactly
    the ``k`` least similar layers and ``τ_n = r_n + 0.01`` merges all of them. When there are more
    than ``max_taus`` such thresholds, evenly spaced ones (by number of merged layers) are kept;
    the values in ``include`` (the paper's 0.35) are always added.
    """
    rs = sorted({round(float(r), 6) for r in rhos})
    if not rs:
        return sorted({float(t) for t in include})
    cands = [(rs[k] + rs[k + 1]) / 2 for k in range(len(rs) - 1)] + [min(1.0, rs[-1] + 0.01)]
    if len(cands) > max_taus:
        idx = sorted({round(i * (len(cands) - 1) / (max_taus - 1)) for i in range(max_taus)})
        cands = [cands[i] for i in idx]
    return sorted({round(t, 4) for t in cands} | {float(t) for t in include})


def neighbours(alpha: float, alphas: Sequence[float]) -> list[float]:
    """The grid values adjacent to ``alpha`` in the sorted α grid (the fine step of coarse-to-fine)."""
    grid = sorted(set(alphas) | {alpha})
    i = grid.index(alpha)
    return [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]
