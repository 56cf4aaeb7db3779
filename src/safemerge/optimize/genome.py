"""The search space of evolutionary merging: a flat gene vector ↔ a mergekit configuration.

Genes follow mergekit-evolve's genotype (Akiba et al. 2024, "Evolutionary optimization of model
merging recipes"; used by Hammoud et al. 2024, §4.4): one value per
``(layer group, model, parameter set, parameter)``:

* parameters per method: ``linear``/``task_arithmetic`` → ``weight``; ``ties``/``dare_ties`` →
  ``weight``, ``density``; ``slerp`` → ``t`` (one global value per group, no per-model axis);
* parameter sets: one per entry of ``filters`` (e.g. ``self_attn``, ``mlp``) plus the rest;
* layer groups: with ``layer_granularity = k > 0`` the blocks are cut into ``⌈L/k⌉`` groups of
  ``k`` consecutive blocks, plus one extra group for the tensors outside the blocks (embeddings,
  final norm, LM head); with ``k = 0`` a single group covers the whole network.

Decoding: ``weight = |x|`` unless negative weights are allowed (mergekit-evolve's convention);
``density = max(0.01, r(x))`` (DARE/TIES need a positive density) and ``t = r(x)`` with the
reflection ``r(x) = 1 − | (|x| mod 2) − 1 |`` that folds ℝ onto [0, 1]. mergekit-evolve clamps
instead (``clip(|x|, 0, 1)``), which makes the objective flat outside [0, 1] so CMA-ES can drift
there with no signal; the reflection is continuous, equals ``x`` on [0, 1] and has no plateaus.
The start point is ``weight = 1/N``, ``density = 1``, ``t = 0.5``.

SLERP over more than two models follows mergekit-evolve's rule (``mergekit/evo/genome.py``,
``_slerp_slices``): one raw ``weight`` gene per (layer group, model); in each group the two models
with the largest genes are merged, the larger one as the base, with ``t = softmax(top-2)[1]``
(so ``t ≤ 0.5``). The decoded genome is a ``slices:`` config, one slice per layer group with its own
``base_model``; tensors outside the blocks follow the first (embeddings) / last (norm, head) slice,
as in mergekit. Ties between equal genes go to the model listed first.

A decoded genome is written as an ordinary mergekit configuration: per-block values become
conditional parameters with filters ``"<prefix>.<i>.<filter>"`` / ``"<prefix>.<i>."`` (mergekit
matches filters as substrings; the trailing dot keeps block 1 from matching block 10), and the
outside-block value is the unconditional default. Values that are equal everywhere collapse to a
scalar. So ``best.yml`` merges with ``safemerge merge`` or mergekit itself.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safemerge.errors import ConfigError
from safemerge.optimize.config import GenomeSection

MIN_DENSITY = 0.01
#: gene value of a model that a SLERP grid point leaves out (below every pair gene, see ``Genome.pair_vector``)
LEFT_OUT_GENE = -100.0
PAIR_GENE_FLOOR = -40.0


def reflect01(x: float) -> float:
    """Fold ℝ onto [0, 1] by reflection at 0 and 1: ``1 − |(|x| mod 2) − 1|`` (identity on [0, 1])."""
    a = abs(float(x)) % 2.0
    return a if a <= 1.0 else 2.0 - a


GeneDecoder = Callable[[float, bool], float]
"""Gene value, ``allow_negative_weights`` → parameter value."""


def decode_weight(x: float, allow_negative_weights: bool) -> float:
    """``|x|`` (mergekit-evolve's convention), or ``x`` itself when negative weights are allowed."""
    return x if allow_negative_weights else abs(x)


def decode_density(x: float, allow_negative_weights: bool) -> float:
    """``max(0.01, r(x))``: DARE/TIES need a positive density."""
    return max(MIN_DENSITY, reflect01(x))


def decode_t(x: float, allow_negative_weights: bool) -> float:
    """``r(x)``, the reflection onto [0, 1]."""
    return reflect01(x)


def raw_gene(x: float, allow_negative_weights: bool) -> float:
    """The gene itself: SLERP's per-model ranking genes, compared and soft-maxed in :meth:`Genome.slerp_pair`."""
    return x


#: the parameters searched for each method, and how a gene value becomes each one (module docstring)
METHOD_PARAMS: dict[str, dict[str, GeneDecoder]] = {
    "linear": {"weight": decode_weight},
    "task_arithmetic": {"weight": decode_weight},
    "ties": {"weight": decode_weight, "density": decode_density},
    "dare_ties": {"weight": decode_weight, "density": decode_density},
    "slerp": {"t": decode_t},
}
#: SLERP over more than two models (mergekit-evolve's ``_slerp_slices``): one raw ``weight`` gene per model and group
SLERP_TOP2_PARAMS: dict[str, GeneDecoder] = {"weight": raw_gene}


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome.

    ``group`` is the layer-group index, or ``-1`` for the outside-block group; ``model`` indexes
    ``Genome.models`` (``-1`` for slerp's global ``t``); ``filter`` is the parameter set
    (``None`` = the rest).
    """

    group: int
    model: int
    filter: str | None
    param: str


class Genome:
    """Genes of one merge method over a model pool, and their decoding into a merge config.

    Args:
        spec: the config's ``genome`` section: ``merge_method`` (one of :data:`METHOD_PARAMS`), the ``models`` pool
            (for slerp: the base model and one other), ``base_model`` (required except for ``linear``),
            ``layer_granularity`` (blocks per group, 0 = whole network), ``filters`` (sub-module names directly
            after the block index, e.g. ``self_attn``, ``mlp``), mergekit-evolve's ``normalize`` and
            ``allow_negative_weights``, fixed global ``parameters`` written into every config, and the
            ``tokenizer_source`` and ``dtype`` passed through to it.
        num_layers: number of transformer blocks of the architecture.
        layer_prefix: tensor-name prefix of the blocks (``"model.layers"``).
    """

    def __init__(self, spec: GenomeSection, *, num_layers: int, layer_prefix: str = "model.layers") -> None:
        merge_method, filters = spec.merge_method, spec.filters
        if merge_method not in METHOD_PARAMS:
            raise ConfigError(f"merge_method {merge_method!r} cannot be optimised",
                              f"use one of: {', '.join(METHOD_PARAMS)}")
        if spec.layer_granularity < 0:
            raise ConfigError("layer_granularity must be ≥ 0", "use 0 (whole network) or a positive block count")
        if num_layers < 1:
            raise ConfigError("the model has no transformer blocks", "check the base model")
        for f in filters:
            if not f.strip("."):
                raise ConfigError(f"genome filter {f!r} is not a sub-module name", "use names such as self_attn or mlp")
        self.method = merge_method
        self.models = list(spec.models)
        self.base_model = spec.base_model
        self.num_layers = int(num_layers)
        self.layer_prefix = layer_prefix
        self.granularity = int(spec.layer_granularity)
        self.filters = [f.strip(".") for f in filters]
        self.normalize = spec.normalize
        self.allow_negative_weights = spec.allow_negative_weights
        self.parameters = dict(spec.parameters)
        self.tokenizer_source = spec.tokenizer_source
        self.dtype = spec.dtype
        self.slerp_top2 = merge_method == "slerp" and len(self.models) > 2
        if self.slerp_top2 and self.filters:
            raise ConfigError("slerp over more than two models takes no genome filters",
                              "remove genome.filters (mergekit-evolve does not split slerp by sub-module)")
        self.params: Mapping[str, GeneDecoder] = SLERP_TOP2_PARAMS if self.slerp_top2 else METHOD_PARAMS[merge_method]
        self.genes = self._layout()
        self._index = {g: i for i, g in enumerate(self.genes)}

    # ------------------------------------------------------------------ layout
    @property
    def n_layer_groups(self) -> int:
        return 1 if self.granularity == 0 else -(-self.num_layers // self.granularity)

    def group_of_layer(self, layer: int) -> int:
        return 0 if self.granularity == 0 else layer // self.granularity

    @property
    def _model_axis(self) -> list[int]:
        return [-1] if self.method == "slerp" and not self.slerp_top2 else list(range(len(self.models)))

    def _layout(self) -> list[Gene]:
        genes: list[Gene] = []
        sets: list[str | None] = [*self.filters, None]
        for g in range(self.n_layer_groups):
            for m in self._model_axis:
                for f in sets:
                    for p in self.params:
                        genes.append(Gene(g, m, f, p))
        if self.granularity > 0 and not self.slerp_top2:
            for m in self._model_axis:
                for p in self.params:
                    genes.append(Gene(-1, m, None, p))
        return genes

    def __len__(self) -> int:
        return len(self.genes)

    # ------------------------------------------------------------------ values
    def x0(self, *, random_init: bool = False, seed: int = 0) -> np.ndarray:
        """Start point: weight 1/N, density 1, t 0.5 (mergekit-evolve), or uniform in [0, 1] when ``random_init``."""
        if random_init:
            return np.random.default_rng(seed).uniform(0.0, 1.0, size=len(self.genes))
        start = {"weight": 1.0 / max(1, len(self.models)), "density": 1.0, "t": 0.5}
        return np.array([start[g.param] for g in self.genes], dtype=np.float64)

    def decode(self, x: Sequence[float]) -> dict[Gene, float]:
        """Parameter value of every gene, by the decoder declared for its parameter (:data:`METHOD_PARAMS`)."""
        if len(x) != len(self.genes):
            raise ValueError(f"genome has {len(self.genes)} genes, got a vector of {len(x)}")
        return {g: round(self.params[g.param](float(v), self.allow_negative_weights), 10)
                for g, v in zip(self.genes, x)}

    def uniform_vector(self, values: dict[str, float]) -> np.ndarray:
        """A gene vector giving every gene of parameter ``p`` the value ``values[p]`` (grid search)."""
        return np.array([float(values[g.param]) for g in self.genes], dtype=np.float64)

    def pair_vector(self, partner: int, t: float) -> np.ndarray:
        """SLERP over > 2 models: genes making every group ``slerp(base, models[partner], t)`` (grid search).

        The base gets 0 and the partner ``ln(t/(1−t))`` when ``t ≤ 0.5`` (the base stays the larger gene
        and ``softmax`` gives back ``t``); for ``t > 0.5`` the roles swap (``slerp(a, b, t) = slerp(b, a, 1−t)``).
        The other models get :data:`LEFT_OUT_GENE`; ``t`` of 0 or 1 is approached to within ``e^-40``.
        """
        base = self.models.index(self.base_model) if self.base_model in self.models else 0
        if partner == base or not 0 <= partner < len(self.models):
            raise ConfigError(f"slerp grid partner {partner} must be a pool model other than the base",
                              "check genome.models")
        small = min(t, 1.0 - t)
        gap = max(PAIR_GENE_FLOOR, float(np.log(small / (1.0 - small)))) if small > 0 else PAIR_GENE_FLOOR
        low, high = (partner, base) if t <= 0.5 else (base, partner)
        genes = {high: 0.0, low: gap}
        return np.array([genes.get(g.model, LEFT_OUT_GENE) for g in self.genes], dtype=np.float64)

    def grid_vector(self, point: dict[str, float]) -> np.ndarray:
        """The gene vector of one grid point (``{"partner", "t"}`` for SLERP over > 2 models)."""
        if self.slerp_top2:
            return self.pair_vector(int(point["partner"]), float(point["t"]))
        return self.uniform_vector(point)

    def slerp_pair(self, vals: dict[Gene, float], group: int) -> tuple[int, int, float]:
        """mergekit-evolve's SLERP rule for one layer group: (base, other, t = softmax(top-2)[1])."""
        genes = [(vals[Gene(group, m, None, "weight")], m) for m in range(len(self.models))]
        (v1, first), (v2, second) = sorted(genes, key=lambda vm: (-vm[0], vm[1]))[:2]
        t = 1.0 / (1.0 + float(np.exp(v1 - v2)))
        return first, second, round(t, 10)

    # ------------------------------------------------------------------ config
    def _value_list(self, vals: dict[Gene, float], model: int, param: str) -> Any:
        """Conditional parameter list (or scalar) for one model and parameter."""
        entries: list[dict[str, Any]] = []
        if self.granularity == 0:
            for f in self.filters:
                entries.append({"filter": f, "value": vals[Gene(0, model, f, param)]})
            default = vals[Gene(0, model, None, param)]
        else:
            for layer in range(self.num_layers):
                g = self.group_of_layer(layer)
                for f in self.filters:
                    entries.append({"filter": f"{self.layer_prefix}.{layer}.{f}",
                                    "value": vals[Gene(g, model, f, param)]})
                entries.append({"filter": f"{self.layer_prefix}.{layer}.", "value": vals[Gene(g, model, None, param)]})
            default = vals[Gene(-1, model, None, param)]
        if all(e["value"] == default for e in entries):
            return default
        return entries + [{"value": default}]

    def to_config(self, x: Sequence[float]) -> dict[str, Any]:
        """The mergekit configuration (a YAML-ready dict) of gene vector ``x``."""
        vals = self.decode(x)
        if self.slerp_top2:
            return self._slerp_slices_config(vals)
        cfg: dict[str, Any] = {"merge_method": self.method}
        if self.base_model:
            cfg["base_model"] = self.base_model
        glob: dict[str, Any] = {}
        if self.method == "slerp":
            other = [m for m in self.models if m != self.base_model]
            cfg["models"] = [{"model": self.base_model}, {"model": other[0]}]
            glob["t"] = self._value_list(vals, -1, "t")
        else:
            cfg["models"] = [
                {"model": m, "parameters": {p: self._value_list(vals, i, p) for p in self.params}}
                for i, m in enumerate(self.models)
            ]
            if self.method in ("linear", "ties", "dare_ties"):
                glob["normalize"] = self.normalize
        glob.update(self.parameters)
        if glob:
            cfg["parameters"] = glob
        if self.tokenizer_source:
            cfg["tokenizer_source"] = self.tokenizer_source
        cfg["dtype"] = self.dtype
        return cfg

    def _group_layers(self, group: int) -> list[int]:
        """``[start, end)`` block range of a layer group."""
        if self.granularity == 0:
            return [0, self.num_layers]
        return [group * self.granularity, min(self.num_layers, (group + 1) * self.granularity)]

    def _slerp_slices_config(self, vals: dict[Gene, float]) -> dict[str, Any]:
        """SLERP over > 2 models: one slice per layer group, its top-2 models and ``t`` (mergekit-evolve)."""
        slices = []
        for group in range(self.n_layer_groups):
            first, second, t = self.slerp_pair(vals, group)
            rng = self._group_layers(group)
            slices.append({"sources": [{"model": self.models[first], "layer_range": rng},
                                       {"model": self.models[second], "layer_range": rng}],
                           "base_model": self.models[first], "parameters": {"t": t}})
        cfg: dict[str, Any] = {"merge_method": "slerp", "slices": slices}
        if self.parameters:
            cfg["parameters"] = dict(self.parameters)
        if self.tokenizer_source:
            cfg["tokenizer_source"] = self.tokenizer_source
        cfg["dtype"] = self.dtype
        return cfg

    def summary_key(self, g: Gene) -> str:
        """The name of gene ``g`` in :meth:`summary` (``model/group[/filter]/param``, e.g. ``expert/g0/weight``)."""
        who = "t" if g.model < 0 else self.models[g.model].rstrip("/").split("/")[-1]
        grp = "all" if self.granularity == 0 else ("outside" if g.group < 0 else f"g{g.group}")
        return "/".join(s for s in (who, grp, g.filter or "", g.param if g.model >= 0 else "") if s)

    def summary(self, x: Sequence[float]) -> dict[str, Any]:
        """Compact, JSON-ready view of the decoded values (for the trace)."""
        out: dict[str, Any] = {self.summary_key(g): v for g, v in self.decode(x).items()}
        if self.slerp_top2:
            vals = self.decode(x)
            for group in range(self.n_layer_groups):
                first, second, t = self.slerp_pair(vals, group)
                grp = "all" if self.granularity == 0 else f"g{group}"
                names = [self.models[i].rstrip("/").split("/")[-1] for i in (first, second)]
                out[f"{grp}/slerp"] = f"{names[0]} -> {names[1]}"
                out[f"{grp}/t"] = t
        return out

    def vector_from_summary(self, values: Mapping[str, Any]) -> np.ndarray:
        """The gene vector of a candidate recorded by :meth:`summary` (a trace row's ``params``), so that a recorded
        candidate can be merged again: ``to_config(vector_from_summary(summary(x))) == to_config(x)``, because every
        decoder is the identity on its own outputs (``|w|`` ≥ 0, densities in [0.01, 1], ``t`` in [0, 1], raw SLERP
        genes). A gene the record lacks is a :class:`ConfigError`."""
        keys = [self.summary_key(g) for g in self.genes]
        if len(set(keys)) < len(keys):
            raise ConfigError("two pool models share a directory name, so a recorded candidate does not say which "
                              "value is whose", "merge again from the trace's gene vector x (Genome.to_config(x))")
        missing = [k for k in keys if k not in values]
        if missing:
            raise ConfigError(f"the recorded candidate lacks {len(missing)} gene(s) of this genome, e.g. {missing[0]}",
                              "use the trace of a run with the same genome (models, method, layer_granularity)")
        return np.array([float(values[k]) for k in keys], dtype=np.float64)
