"""The ``safemerge optimize`` YAML schema (pydantic), modelled on mergekit-evolve's ``genome:`` block.

```yaml
genome:                       # what is searched (mergekit-evolve's block, same names)
  models: [ALIGNED, EXPERT, BAD]
  base_model: ALIGNED
  merge_method: dare_ties     # linear | task_arithmetic | ties | dare_ties | slerp
  layer_granularity: 0        # 0 = one value per model for the whole network; k = groups of k blocks
  filters: []                 # e.g. [self_attn, mlp]: separate genes for these sub-modules
  normalize: false
  allow_negative_weights: false
  parameters: {}              # fixed global parameters passed through (e.g. int8_mask: true)
  tokenizer_source: null
  dtype: float32              # dtype of the saved model
data:
  safety: [d_safety.jsonl]    # records {prompt, response}; files may hold both types (split by `type`)
  expert: [d_expert.jsonl]
  n_safety: 64                # fixed sample size (null = all)
  n_expert: 64
  seed: 0
objective: {alpha: 0.3, batch_size: 8, max_length: 512}
strategy: evomm               # evomm | cocktail | grid (the CLI's --strategy overrides)
cma: {sigma0: 0.1667, popsize: null, max_evals: 100, seed: 0, random_init: false}
cocktail: {temperature: 1.0}
grid: {weight: [0.25, 0.5, 1.0], density: [0.25, 0.5, 1.0], t: [0.1, ..., 1.0]}
ray: {workers: 2, address: null, cpus_per_worker: 1, gpus_per_worker: 0}
seed: 0                       # merge seed (DARE's random masks), fixed for every candidate
```
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safemerge.config.yaml_io import load_yaml_file
from safemerge.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenomeSection(_Strict):
    models: list[str] = Field(min_length=1)
    merge_method: Literal["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]
    base_model: str | None = None
    layer_granularity: int = Field(0, ge=0)
    filters: list[str] = Field(default_factory=list)
    normalize: bool = False
    allow_negative_weights: bool = False
    parameters: dict[str, Any] = Field(default_factory=dict)
    tokenizer_source: str | None = None
    dtype: str = "float32"


class DataSection(_Strict):
    safety: list[str] = Field(default_factory=list)
    expert: list[str] = Field(default_factory=list)
    n_safety: int | None = Field(None, ge=1)
    n_expert: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("safety", "expert", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else ([] if v is None else v)


class ObjectiveSection(_Strict):
    alpha: float = Field(0.3, ge=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    #: compute dtype of the scoring model: ``auto`` = bfloat16 where the device runs it natively, else float32
    #: (:func:`safemerge.evaluate.generate.resolve_dtype`); resolved once per run and recorded in the summary
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: L_safety over the first N answer tokens of each D_safety example (null: all of them, the paper's Eq. 4)
    safety_tokens: int | None = Field(None, ge=1)


class CMASection(_Strict):
    sigma0: float = Field(1 / 6, gt=0)
    popsize: int | None = Field(None, ge=2)
    max_evals: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    random_init: bool = False


class CocktailSection(_Strict):
    temperature: float = Field(1.0, gt=0)


class GridSection(_Strict):
    weight: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0])
    density: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0])
    t: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])


class RaySection(_Strict):
    workers: int = Field(2, ge=1)
    address: str | None = None
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class OptimizeConfig(_Strict):
    genome: GenomeSection
    data: DataSection = Field(default_factory=DataSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    strategy: Literal["evomm", "cocktail", "grid"] = "evomm"
    cma: CMASection = Field(default_factory=CMASection)
    cocktail: CocktailSection = Field(default_factory=CocktailSection)
    grid: GridSection = Field(default_factory=GridSection)
    ray: RaySection = Field(default_factory=RaySection)
    seed: int = 0


def load_optimize_config(source: str | Path | dict[str, Any] | OptimizeConfig) -> OptimizeConfig:
    """Parse and validate an optimize YAML file (or dict); errors name the field and the fix."""
    if isinstance(source, OptimizeConfig):
        return source
    if isinstance(source, dict):
        raw = source
    else:
        p = Path(source).expanduser()
        if not p.exists():
            raise ConfigError(f"optimize config {str(source)!r} does not exist", "check the path")
        raw = load_yaml_file(p, "optimize config")
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with a 'genome:' block",
                              "see docs/optimize.md for the schema")
    try:
        cfg = OptimizeConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        hint = "see docs/optimize.md for the optimize config schema"
        if err["type"] == "extra_forbidden":
            import difflib

            sections = (OptimizeConfig, GenomeSection, DataSection, CMASection, ObjectiveSection)
            known = [name for section in sections for name in section.model_fields]
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            msg = "unknown field"
            if close:
                hint = f"did you mean {close[0]!r}?"
        raise ConfigError(f"optimize config: {loc}: {msg}", hint) from None
    g = cfg.genome
    if g.merge_method in ("task_arithmetic", "ties", "dare_ties", "slerp") and not g.base_model:
        raise ConfigError(f"genome: merge_method {g.merge_method!r} needs a base_model",
                          "add base_model: PATH to the genome block")
    if g.merge_method == "slerp":
        others = [m for m in g.models if m != g.base_model]
        if len(g.models) <= 2 and len(others) != 1:
            raise ConfigError("genome: slerp merges exactly two models (base_model and one other)",
                              "list the base model and one other model, or three or more models for mergekit-evolve's "
                              "top-2 rule")
        if len(g.models) > 2 and g.base_model not in g.models:
            raise ConfigError("genome: slerp over more than two models needs base_model among genome.models",
                              "add the base model to genome.models")
    return cfg
