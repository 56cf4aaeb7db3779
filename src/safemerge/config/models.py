"""Pydantic models of mergekit's merge YAML (``merge_method``, ``models``/``slices``, ``parameters`` …).

The schema follows mergekit 0.1.5 so existing configs work unchanged. Differences are
deliberate and strict: unknown top-level keys, unknown methods and parameters that the
chosen method does not accept are errors (mergekit silently ignores them), and every
validation error names the field and the fix in one line.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from safemerge.config.yaml_io import load_yaml
from safemerge.errors import ConfigError
from safemerge.io.text import read_utf8

Scalar = Union[bool, int, float, str]


class ConditionalParameter(BaseModel):
    """A parameter value that applies to tensors whose name contains ``filter`` (mergekit semantics)."""

    model_config = ConfigDict(extra="forbid")
    value: "ParameterSetting"
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], list[Scalar], Scalar]
ConditionalParameter.model_rebuild()

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def _norm_dtype(v: Any) -> str | None:
    if v is None:
        return None
    s = _DTYPE_ALIASES.get(str(v), str(v)).replace("torch.", "")
    if s not in DTYPES:
        raise ValueError(f"unsupported dtype {v!r}; use one of {', '.join(DTYPES)}")
    return s


class InputModel(BaseModel):
    """One entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterSetting] | None = None


class InputSlice(BaseModel):
    """One source of a slice: ``model`` + half-open ``layer_range``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range {list(v)} must satisfy 0 <= start <= end")
        return v


class OutputSlice(BaseModel):
    """One entry of ``slices:``; all sources must span the same number of layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "OutputSlice":
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lens = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lens) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lens)}")
        return self


class ModelTokenSource(BaseModel):
    """``{kind: model_token, model: M, token: T | token_id: I}``: the embedding of another token of M."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenSource":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("a model_token source needs exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(BaseModel):
    """``{kind: zero}``: a zero embedding."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """One entry of ``tokenizer.tokens``: where the token's embedding comes from for models that
    lack it (all models with ``force: true``). ``source`` is a model path, a model_token or zero."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Union[Annotated[Union[ModelTokenSource, ZeroSource], Field(discriminator="kind")], str]
    force: bool = False


class TokenizerConfig(BaseModel):
    """mergekit's ``tokenizer:`` block: ``source`` (``union`` — mergekit's default —, ``base`` or a
    model), per-token embedding ``tokens`` and ``pad_to_multiple_of`` (see engine/vocab.py)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(BaseModel):
    """A merge configuration (mergekit-compatible YAML)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = Field(default=None, description="optional label (mergekit-multi)")
    _source_text: str | None = PrivateAttr(default=None)

    _dt = field_validator("dtype", "out_dtype")(classmethod(lambda cls, v: _norm_dtype(v)))

    @model_validator(mode="after")
    def _one_input_kind(self) -> "MergeConfig":
        n = sum(x is not None and x != [] and x != {} for x in (self.models, self.slices, self.modules))
        if n != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given")
        if self.modules:
            raise ValueError("'modules' (multi-module / vision-language merges) is not supported yet; use 'models' or "
                             "'slices'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer' or 'tokenizer_source', not both")
        return self

    @property
    def effective_tokenizer_source(self) -> str | None:
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model reference in the config, base first, without duplicates, in order."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))

    def to_yaml_dict(self) -> dict[str, Any]:
        """A plain dict suitable for ``yaml.safe_dump`` (mergekit-compatible)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_yaml_dict(), sort_keys=False)

    @property
    def source_text(self) -> str:
        """The YAML exactly as the user wrote it (comments included) when the config came from
        YAML text or a file; otherwise the normalised :meth:`to_yaml` dump."""
        return self._source_text if self._source_text is not None else self.to_yaml()


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in ("ConditionalParameter", "list[ConditionalParameter]", "list[union[bool,int,float,str]]")
              or "union" in str(part) or str(part) in ("bool", "int", "float", "str")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


_FIELDS = list(MergeConfig.model_fields)


def _validation_error(exc: ValidationError) -> ConfigError:
    errs = exc.errors()
    err = next((e for e in errs if e.get("type") == "extra_forbidden"), errs[0])
    loc = _loc(tuple(err.get("loc", ())))
    typ = err.get("type", "")
    if typ == "extra_forbidden":
        key = str(err["loc"][-1])
        known = _FIELDS + ["model", "parameters", "layer_range", "sources", "filter", "value"]
        close = difflib.get_close_matches(key, known, n=1)
        return ConfigError(f"unknown key {key!r} at {loc}", f"did you mean {close[0]!r}?" if close else "remove it")
    if typ == "missing":
        return ConfigError(f"missing required field {loc!r}", f"add '{str(err['loc'][-1])}:' to the config")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ConfigError(f"invalid config at {loc}: {msg}", "see docs/cli.md for the configuration format")


def load_config(source: str | Path | dict[str, Any] | MergeConfig) -> MergeConfig:
    """Parse a YAML file, a YAML string, a dict or a :class:`MergeConfig` into a validated config."""

    if isinstance(source, MergeConfig):
        return source
    data: Any = source
    data_text = source if isinstance(source, str) else None
    where = "config"
    names_a_file = isinstance(source, str) and "\n" not in source and (source.endswith((".yml", ".yaml"))
                                                                       or Path(source).exists())
    if isinstance(source, Path) or names_a_file:
        p = Path(source)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist", "check the path")
        if p.is_dir():
            raise ConfigError(f"config path {str(p)!r} is a directory", "pass a YAML file")

        data = data_text = read_utf8(p, "config")
        where = str(p)
    if isinstance(data, str):
        data = load_yaml(data, source=where)
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with at least 'merge_method' and 'models'",
                          "see docs/cli.md for an example")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if isinstance(source, (str, Path)):
        config._source_text = data_text
    return config

