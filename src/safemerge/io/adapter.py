"""PEFT LoRA adapters: read lazily, write in the PEFT on-disk format, apply while streaming.

On disk an adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r × in) and ``….lora_B.weight`` (out × r).
The update of one module is (Hu et al. 2021, LoRA, Eq. 3)::

    ΔW = s · B A,   s = lora_alpha / r   (rsLoRA, Kalajdzievski 2023: s = lora_alpha / √r)

with ``rank_pattern``/``alpha_pattern`` overriding ``r``/``lora_alpha`` per module and
``fan_in_fan_out`` storing the weight transposed (GPT-2 ``Conv1D``). Embedding LoRAs
(``lora_embedding_A``: r × vocab, ``lora_embedding_B``: dim × r) give ΔW = s · (B A)ᵀ.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safemerge.errors import CheckpointError
from safemerge.io.checkpoint import Checkpoint, require_regular_file
from safemerge.io.hub import resolve_local
from safemerge.options import RunOptions

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!weight$|bias$)[A-Za-z0-9_\-]+)?(?P<param>\.weight|\.bias)?$"
)
# Rows per LoRA product block: fixed and aligned to the tensor, so that the product's bits never
# depend on the engine's memory budget (see LoraModule.delta_rows).
LORA_ROW_BLOCK = 64

# transformers' GPT-2-style ``Conv1D`` layers (weight stored in × out): the only layers PEFT applies
# ``fan_in_fan_out`` to. On an ``nn.Linear`` PEFT ignores the flag (with a warning), and so do we.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

# Adapter tensors that are neither LoRA factors nor full weights and that we cannot apply.
_UNSUPPORTED_KEY = re.compile(r"\.(lora_magnitude_vector|lora_E|ia3_l|hada_w|lokr_w|oft_r|boft_R)\b")
# PEFT trainable tokens (``trainable_token_indices``): the new values of some embedding rows.
_TOKEN_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[A-Za-z0-9_\-]+)?$")
# adapter_config.json fields that describe the non-LoRA parts (copied when an adapter is rewritten)
NON_LORA_CONFIG_FIELDS = ("modules_to_save", "bias", "trainable_token_indices")


@dataclass
class LoraModule:
    """One adapted module: ``ΔW = scaling · B @ A`` (transposed for fan_in_fan_out / embeddings).

    Attributes:
        name: module path in the base model, e.g. ``model.layers.3.self_attn.q_proj``.
        A: down-projection, shape (r, in).
        B: up-projection, shape (out, r).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / √r`` for rsLoRA).
        transpose: the base weight is stored as (in, out) (fan_in_fan_out or an embedding).
    """

    name: str
    A: Any
    B: Any
    scaling: float
    transpose: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def weight_name(self) -> str:
        """Name of the base tensor this module updates."""
        return f"{self.name}.weight"

    def delta(self, dtype: Any = None):
        """The dense update ΔW in the base weight's layout (float32 unless ``dtype``)."""

        dt = dtype or torch.float32
        if dt == torch.float32:
            rows = int(self.A.shape[1] if self.transpose else self.B.shape[0])
            return self.delta_rows(0, rows)
        d = (self.B.to(dt) @ self.A.to(dt)) * self.scaling
        return d.T.contiguous() if self.transpose else d

    def delta_rows(self, start: int, stop: int):
        """Rows ``[start, stop)`` of ΔW (base-weight layout) in float32, bit-stable.

        BLAS libraries choose a kernel (and so a rounding) by matrix height, so ``B[i:j] @ A``
        differs in the last bit between block heights on some CPUs (AVX-512 builds of oneDNN/MKL).
        The product is therefore always computed in fixed blocks of :data:`LORA_ROW_BLOCK` rows
        aligned to the tensor: a row's bits do not depend on which rows were asked for, so a
        row-blocked merge equals the whole-tensor merge bit for bit on every machine.
        """

        A, B = self.A.to(torch.float32), self.B.to(torch.float32)
        n = int(A.shape[1] if self.transpose else B.shape[0])
        lo, hi = start - start % LORA_ROW_BLOCK, min(n, -(-stop // LORA_ROW_BLOCK) * LORA_ROW_BLOCK)
        pieces = []
        for i in range(lo, hi, LORA_ROW_BLOCK):
            j = min(i + LORA_ROW_BLOCK, n)
            # ΔW = s·B A, or s·(B A)ᵀ = s·Aᵀ Bᵀ for the transposed layout
            block = A[:, i:j].T @ B.T if self.transpose else B[i:j] @ A
            pieces.append(block * self.scaling)
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out[start - lo : stop - lo]

    def scaled_factors(self, dtype: Any = None):
        """``(A, s·B)``: factors whose plain product is ΔW (in the out × in orientation)."""

        dt = dtype or torch.float32
        return self.A.to(dt), self.B.to(dt) * self.scaling


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_adapter_config(cfg_path: Path, config: Any) -> None:
    """Check the fields of ``adapter_config.json`` that the LoRA update depends on.

    ``r`` (and every ``rank_pattern`` value) must be a positive integer, ``lora_alpha`` (and every
    ``alpha_pattern`` value) a finite number, the pattern keys valid regular expressions (PEFT
    matches them with ``re``), and the flags booleans.
    """
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{cfg_path}: {problem}", "fix adapter_config.json or re-save the adapter with PEFT")

    if not isinstance(config, dict):
        raise bad(f"expected a JSON object, got a {type(config).__name__}")
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad(f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not _is_number(alpha):
        raise bad(f"lora_alpha must be a number, got {alpha!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise bad(f"{field} must be an object mapping module patterns to values")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise bad(f"{field} key {key!r} is not a valid regular expression ({exc})") from None
            is_rank = field == "rank_pattern"
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0 if is_rank else _is_number(value)
            if not ok:
                raise bad(f"{field}[{key!r}] must be a {'positive integer' if is_rank else 'number'}, got {value!r}")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if flag in config and not isinstance(config[flag], (bool, type(None))):
            raise bad(f"{flag} must be true or false, got {config[flag]!r}")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module whose path ends in it."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter(Mapping):
    """A lazy mapping ``module path → LoraModule`` over a PEFT LoRA adapter directory."""

    def __init__(self, path: str | Path, *, options: RunOptions | None = None) -> None:
        self.path = resolve_local(path, options=options)  # Hub ids → their local snapshot
        self.config: dict[str, Any] = self._read_config()
        self._tensors = self._open_weights(options)
        self._index: dict[str, dict[str, str]] = {}
        self.extra_weights: dict[str, str] = {}
        self.token_rows: dict[str, tuple[str, list[int]]] = {}
        self.base_model_type: str | None = None  # set by the model the adapter is applied to
        for key in self._tensors.names():
            self._index_key(key)
        for mod, kinds in self._index.items():
            if not ({"lora_A", "lora_B"} <= kinds.keys() or {"lora_embedding_A", "lora_embedding_B"} <= kinds.keys()):
                raise CheckpointError(f"{self.path}: module {mod} has only {sorted(kinds)}",
                                      "the adapter is incomplete; re-save it")
        if not self._index:
            raise CheckpointError(f"{self.path} contains no LoRA weights", "check that this is a trained LoRA adapter")

    def _read_config(self) -> dict[str, Any]:
        """``adapter_config.json``, validated: a plain LoRA (no other PEFT type, no DoRA)."""

        cfg_path = self.path / ADAPTER_CONFIG
        if not self.path.is_dir():
            raise CheckpointError(f"adapter path {str(self.path)!r} does not exist or is not a directory",
                                  "pass a PEFT adapter directory")
        if not cfg_path.exists():
            raise CheckpointError(f"{self.path} is not a PEFT adapter (no {ADAPTER_CONFIG})",
                                  "pass a directory written by save_pretrained")
        require_regular_file(cfg_path, "adapter config")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})", "fix or re-save the adapter") from exc
        validate_adapter_config(cfg_path, config)
        ptype = str(config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{self.path} is a {ptype} adapter; only LoRA adapters are supported",
                                  "use a LoRA adapter")
        if config.get("use_dora"):
            raise CheckpointError(f"{self.path} is a DoRA adapter, which is not supported", "use a plain LoRA adapter")
        return config

    def _open_weights(self, options: RunOptions | None) -> Any:
        """The adapter's weight file as a checkpoint: safetensors, or a pickle with ``options.allow_pickle``."""

        for name in (ADAPTER_WEIGHTS, ADAPTER_PICKLE):
            if (self.path / name).exists():
                return Checkpoint(self.path / name, options=options)
        raise CheckpointError(f"{self.path} has no {ADAPTER_WEIGHTS}", "re-save the adapter with save_pretrained")

    def _index_key(self, key: str) -> None:
        """File one stored tensor: a LoRA factor, trainable token rows, or a full replacement weight."""
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.match(k)
        tok = _TOKEN_KEY.match(k)
        if tok:
            module = tok.group("module")
            self.token_rows[f"{module}.weight"] = (key, self._token_indices(module))
            return
        if m and m.group("param") == ".bias":
            raise CheckpointError(
                f"{self.path}: {k} is a LoRA bias (lora_bias=True), which is not supported",
                "train the adapter with lora_bias=False",
            )
        if m:
            self._index.setdefault(m.group("module"), {})[m.group("kind")] = key
        elif _UNSUPPORTED_KEY.search(k):
            raise CheckpointError(f"{self.path}: tensor {k} is not a plain LoRA weight", "use a plain LoRA adapter")
        else:
            # Full replacement weights: modules_to_save (``lm_head.weight``, in memory
            # ``lm_head.modules_to_save.default.weight``) and, for embedding LoRAs, the saved
            # embedding matrix (``embed_tokens.base_layer.weight``, save_embedding_layers=True).
            name = k.replace(".modules_to_save.default", "").replace(".original_module", "")
            self.extra_weights[name.replace(".base_layer", "")] = key

    def _token_indices(self, module: str) -> list[int]:
        """The rows of ``module`` that PEFT's trainable tokens replace (``trainable_token_indices``)."""
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):
            spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
        if not isinstance(spec, list) or not all(isinstance(i, int) and i >= 0 for i in spec):
            raise CheckpointError(
                f"{self.path}: trainable tokens of {module} have no valid trainable_token_indices in {ADAPTER_CONFIG}",
                "re-save the adapter with save_pretrained",
            )
        return [int(i) for i in spec]

    @property
    def non_lora_keys(self) -> list[str]:
        """Stored keys of everything that is not a LoRA factor (saved modules, biases, trainable tokens)."""
        return sorted([*self.extra_weights.values(), *(key for key, _ in self.token_rows.values())])

    def non_lora_parts(self) -> dict[str, str]:
        """Base tensor name → what the adapter does to it outside LoRA (for reports and model cards)."""
        parts: dict[str, str] = {}
        for name, key in sorted(self.extra_weights.items()):
            if name.endswith(".bias"):
                parts[name] = "bias (replaced)"
            elif ".base_layer." in key:
                parts[name] = "saved embedding (replaced)"
            else:
                parts[name] = "modules_to_save (replaced)"
        for name, (_key, rows) in sorted(self.token_rows.items()):
            parts[name] = f"trainable tokens ({len(rows)} rows replaced)"
        return parts

    def apply_non_lora(self, name: str, t: Any) -> Any | None:
        """``t`` (base tensor ``name``) with the adapter's non-LoRA change, or ``None`` if it has none.

        modules_to_save and LoRA biases (``bias="lora_only"``/``"all"``) replace the tensor;
        trainable tokens overwrite their rows (``W.index_copy(0, indices, values)``, as PEFT merges).
        """

        out = None
        key = self.extra_weights.get(name)
        if key is not None:
            out = self._tensors.get(key, dtype=torch.float32).to(t.dtype)
        if name in self.token_rows:
            key, rows = self.token_rows[name]
            values = self._tensors.get(key, dtype=torch.float32).to(t.dtype)
            out = (t if out is None else out).index_copy(0, torch.tensor(rows, dtype=torch.long), values)
        return out

    def non_lora_tensors(self) -> dict[str, Any]:
        """Stored key → tensor (as stored) of every non-LoRA part, to carry into a rewritten adapter."""
        return {key: self._tensors.get(key, dtype=None) for key in self.non_lora_keys}

    def non_lora_config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` fields that PEFT needs to load the non-LoRA parts."""
        return {f: self.config[f] for f in NON_LORA_CONFIG_FIELDS if f in self.config}

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.r))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def scaling(self, module: str) -> float:
        """Per-module scale: ``alpha/r`` or rsLoRA ``alpha/√r``, honouring rank/alpha patterns."""
        r = _pattern_value(self.config.get("rank_pattern"), module, self.r)
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.lora_alpha)
        return float(alpha) / (math.sqrt(r) if self.use_rslora else float(r))

    def _is_conv1d(self, module: str) -> bool:
        """Whether ``module`` stores its weight as (in, out), PEFT's rule for ``fan_in_fan_out``:
        only GPT-2-style ``Conv1D`` layers are; an ``nn.Linear`` never is, whatever the flag says.
        Without a known base model the flag is taken at its word."""
        if self.base_model_type is None:
            return bool(self.config.get("fan_in_fan_out", False))
        return self.base_model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES

    def rank_of(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern"), module, self.r))

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, module: str) -> LoraModule:
        kinds = self._index[module]
        if "lora_A" in kinds:
            A = self._tensors[kinds["lora_A"]]
            B = self._tensors[kinds["lora_B"]]
            transpose = self._is_conv1d(module)
        else:
            A = self._tensors[kinds["lora_embedding_A"]]
            B = self._tensors[kinds["lora_embedding_B"]]
            transpose = True
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"{self.path}: module {module} has inconsistent LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)}",
                "re-save the adapter",
            )
        if A.shape[0] != self.rank_of(module):
            raise CheckpointError(
                f"{self.path}: module {module} has rank {A.shape[0]} but adapter_config.json says "
                f"r={self.rank_of(module)}",
                "the config does not belong to these weights; re-save the adapter",
            )
        return LoraModule(module, A, B, self.scaling(module), transpose)

    @cached_property
    def weight_names(self) -> dict[str, str]:
        """Base tensor name → module path for every adapted module."""
        return {f"{m}.weight": m for m in self._index}

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self)}, r={self.r})"


def load_adapter(path: str | Path, *, options: RunOptions | None = None) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory lazily (factors holding NaN/Inf are refused on read unless
    ``options.allow_nonfinite``; a pickled ``adapter_model.bin`` only with ``options.allow_pickle``)."""
    return LoraAdapter(path, options=options)


def check_adapter_fits(adapter: LoraAdapter, contains: Callable[[str], bool], shape: Callable[[str], tuple[int, ...]],
                       base_label: Any) -> None:
    """Refuse an adapter that does not belong to a model: a target or saved weight the model lacks,
    factors whose rank differs from ``adapter_config.json``, or a ΔW of the wrong shape.

    Args:
        contains / shape: the model's tensor lookup (a checkpoint, or a loaded model's state dict).
        base_label: how the model is named in the message.
    """
    hint = "apply the adapter to the model it was trained on"
    for w in [*adapter.weight_names, *adapter.extra_weights, *adapter.token_rows]:
        if not contains(w):
            raise CheckpointError(
                f"adapter {adapter.path} targets {w!r}, which is not in the base model {base_label}", hint)
    for w, (_key, rows) in adapter.token_rows.items():
        if rows and max(rows) >= shape(w)[0]:
            raise CheckpointError(f"adapter {adapter.path} replaces row {max(rows)} of {w!r}, "
                                  f"which has {shape(w)[0]} rows", hint)
    for w, m in adapter.weight_names.items():
        mod = adapter[m]  # checks the factors' rank against adapter_config.json
        want = (int(mod.B.shape[0]), int(mod.A.shape[1]))
        if mod.transpose:
            want = want[::-1]
        have = tuple(shape(w))
        if have != want:
            raise CheckpointError(
                f"adapter module {m} gives ΔW of shape {want} but base tensor {w} has shape {have}", hint)


class AdaptedCheckpoint(Mapping):
    """``base + adapter`` as one lazy checkpoint: each target weight gets ``+ΔW`` as it is read.

    No merged copy of the model exists on disk or in memory; the extra cost is one r-rank
    product per adapted tensor, computed in float32.
    """

    def __init__(self, base: Any, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.path = base.path
        adapter.base_model_type = base.config.get("model_type")
        check_adapter_fits(adapter, lambda w: w in base, self.shape, base.path)

    # Metadata is the base model's.
    config = property(lambda self: self.base.config)
    aliases = property(lambda self: self.base.aliases)
    num_layers = property(lambda self: self.base.num_layers)
    architecture = property(lambda self: self.base.architecture)
    tie_word_embeddings = property(lambda self: self.base.tie_word_embeddings)
    embedding_name = property(lambda self: self.base.embedding_name)
    format = property(lambda self: self.base.format)

    def names(self) -> list[str]:
        return self.base.names()

    def _replacement(self, name: str) -> str | None:
        """Adapter key of a full replacement weight for base tensor ``name`` (modules_to_save)."""
        extra = self.adapter.extra_weights
        return extra.get(name) or extra.get(self.base.aliases.get(name, name))

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._replacement(name)
        return tuple(self.adapter._tensors.shape(key)) if key else tuple(self.base.shape(name))

    def dtype_name(self, name: str) -> str:
        key = self._replacement(name)
        return self.adapter._tensors.dtype_name(key) if key else self.base.dtype_name(name)

    def nbytes(self, name: str) -> int:
        key = self._replacement(name)
        return self.adapter._tensors.nbytes(key) if key else self.base.nbytes(name)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, name: str):
        return self.get(name, dtype=None)

    def get_rows(self, name: str, start: int, stop: int, dtype: Any = "float32"):
        """Rows ``[start, stop)`` of base + ΔW, computing only those rows of the low-rank update."""

        real = self.base.aliases.get(name, name)
        if real in self.adapter.extra_weights or real in self.adapter.token_rows:
            return self.get(name, dtype=dtype)[start:stop]
        if real not in self.adapter.weight_names:
            return self.base.get_rows(real, start, stop, dtype=dtype)
        rows = self.adapter[self.adapter.weight_names[real]].delta_rows(start, stop)
        t = self.base.get_rows(real, start, stop, dtype=torch.float32) + rows
        if dtype is None:
            return t.to(getattr(torch, self.base.dtype_name(real)))
        return t.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)

    def get(self, name: str, dtype: Any = "float32", device: str = "cpu"):  # type: ignore[override]
        """Base tensor plus the adapter's ΔW (computed in float32, then cast to ``dtype``)."""

        real = self.base.aliases.get(name, name)
        key = self._replacement(name)
        source, source_name = (self.adapter._tensors, key) if key else (self.base, real)
        lora = real in self.adapter.weight_names
        if lora or real in self.adapter.token_rows:
            stored = source.dtype_name(source_name)
            w = source.get(source_name, dtype=torch.float32)
            w = self.adapter.apply_non_lora(real, w) if real in self.adapter.token_rows else w
            if lora:
                w = w + self.adapter[self.adapter.weight_names[real]].delta()
            t = w if dtype is not None else w.to(getattr(torch, stored))
        else:
            t = source.get(source_name, dtype=None)
        if dtype is not None and t.is_floating_point():
            t = t.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return t.to(device) if device != "cpu" else t


def save_adapter(
    path: str | Path,
    modules: Mapping[str, tuple[Any, Any]],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    dtype: Any = None,
    embedding_modules: Collection[str] = (),
    extra_tensors: Mapping[str, Any] | None = None,
) -> None:
    """Write a PEFT LoRA adapter whose module ``m`` has ``ΔW = B @ A`` exactly (scaling 1).

    Args:
        path: output directory (created; callers wanting atomicity pass a temporary directory).
        modules: module path → ``(A, B)`` in PEFT's orientation — A (r × in), B (out × r), as
            returned by :meth:`LoraModule.scaled_factors`; scales must already be folded into the
            factors. Ranks may differ per module (written as ``rank_pattern``/``alpha_pattern``).
        base_model_name_or_path: recorded in the config.
        fan_in_fan_out: the target layers store their weight as (in, out) (GPT-2 ``Conv1D``);
            the stored-layout update is then ``(B @ A)ᵀ``, exactly as PEFT applies it.
        dtype: storage dtype of the factors (default: float32).
        embedding_modules: modules that are embeddings (``nn.Embedding``); their factors are
            written as ``lora_embedding_A`` (r × vocab) / ``lora_embedding_B`` (dim × r) and PEFT
            applies ``ΔW = (B @ A)ᵀ`` to the (vocab × dim) matrix, like :class:`LoraModule` with
            ``transpose=True``.
        extra_tensors: stored key → tensor written unchanged next to the factors: the non-LoRA
            parts of an adapter (:meth:`LoraAdapter.non_lora_tensors`); pass the config fields
            that describe them (:meth:`LoraAdapter.non_lora_config`) in ``extra_config``.

    Every module gets ``lora_alpha == r`` so that PEFT's scaling is exactly 1 (no rsLoRA;
    LoRA, Hu et al. 2021, Eq. 3 with α = r). The directory loads with
    ``peft.PeftModel.from_pretrained``.
    """

    if not modules:
        raise CheckpointError("refusing to write an adapter with no modules", "check the layer selection")
    stray = sorted(set(embedding_modules) - set(modules))
    if stray:
        raise CheckpointError(f"embedding module {stray[0]!r} has no factors", "pass only modules present in `modules`")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    r0, pattern = _rank_pattern(modules)
    tensors = _factor_tensors(modules, embedding_modules, dtype or torch.float32)
    config = _lora_config(r0, pattern, task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                          fan_in_fan_out=fan_in_fan_out, target_modules=sorted(modules))
    if extra_config:
        config.update(extra_config)
    for key, t in sorted((extra_tensors or {}).items()):
        if key in tensors:
            raise CheckpointError(f"adapter tensor {key!r} is both a LoRA factor and an extra tensor", "internal error")
        tensors[key] = t.detach().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rank_pattern(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, dict[str, int]]:
    """The adapter's ``r`` (the most common rank; the smallest among equally common ones) and PEFT's
    ``rank_pattern`` (escaped module name → rank) of the modules whose rank differs."""
    ranks = {m: int(A.shape[0]) for m, (A, B) in modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    return r0, {re.escape(m): r for m, r in sorted(ranks.items()) if r != r0}


def _factor_tensors(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], embedding_modules: Collection[str],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's stored keys → factors in ``dtype`` (``lora_embedding_A/B`` for embedding modules); ranks checked."""
    tensors: dict[str, torch.Tensor] = {}
    for m, (A, B) in sorted(modules.items()):
        if A.shape[0] != B.shape[1]:
            raise CheckpointError(f"module {m}: A{tuple(A.shape)} and B{tuple(B.shape)} ranks differ",
                                  "internal shape error")
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if m in embedding_modules else ("lora_A.weight",
                                                                                              "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{m}.{a_key}"] = A.detach().to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{m}.{b_key}"] = B.detach().to(dtype).contiguous()
    return tensors


def _lora_config(r0: int, pattern: dict[str, int], *, task_type: str, base_model_name_or_path: str | None,
                 fan_in_fan_out: bool, target_modules: list[str]) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA with ``lora_alpha == r`` for every module (PEFT scaling exactly 1)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": target_modules,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
