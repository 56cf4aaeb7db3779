"""Generation backends behind one interface: transformers (batched, left-padded) and vLLM.

:func:`load_generator` returns a :class:`Generator` whose :meth:`~HFGenerator.generate` takes
plain strings (each becomes one user turn) or chats (lists of ``{role, content}``), applies the
model's chat template, decodes greedily and returns only the new text, truncated at the first
stop string.

Speed (issue 13): :func:`resolve_dtype` is the one place that picks the compute dtype — bfloat16
where the CPU multiplies bf16 natively (AVX512-BF16 / AMX on x86, the ``bf16`` feature on ARM) or
on CUDA, float32 elsewhere. The transformers backend sorts prompts by length (results come back
in input order), sizes batches from physical memory (:func:`memory_batch_size`) and runs its own
greedy loop (:meth:`HFGenerator._decode`) that drops a row from the batch and its KV cache as soon
as it ends, so finished sequences stop costing compute. The tokens every row of a batch begins with
(the chat template's system turn and user header: 24 of SmolLM2's ~42 prompt tokens) are run once and
their KV cache shared by all rows (:meth:`HFGenerator._prefill`; 17–22 % less generation time measured,
the same texts in float32).

Batched generation equals one-at-a-time generation: prompts are left-padded, the attention mask
hides the padding and position ids come from the mask (``cumsum(mask) - 1``), so every row sees
exactly the positions and keys it would see alone. A shared prefix keeps that: its keys sit at
positions ``0 … P−1`` of every row, the padding between it and a row's own tokens is masked, and the
row's positions continue at ``P``. In float32 on CPU the token ids match exactly (tested in
``tests/test_eval_generate.py``); in bf16/fp16 the different matmul shapes of a padded batch can flip
a near-tie argmax, as with any batched inference.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safemerge.errors import CheckpointError, SafemergeError, option
from safemerge.io.adapter import check_adapter_fits, load_adapter
from safemerge.io.chat import render_chat_template
from safemerge.io.checkpoint import refuse_custom_code
from safemerge.io.hub import resolve_local, split_model_ref
from safemerge.options import RunOptions, or_default
from safemerge.progress import progress_bar

Prompt = str | list[dict[str, str]]

GPU_BATCH_SIZE = 64
#: Largest CPU batch: beyond it a 2-core CPU gains nothing (measured in docs/benchmarks.md).
MAX_CPU_BATCH = 64
MAX_GPU_BATCH = 256
#: Share of physical memory the KV cache and activations of one batch may use.
BATCH_MEMORY_FRACTION = 0.1
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "half": "float16"}


@runtime_checkable
class Generator(Protocol):
    """What every backend provides."""

    backend: str
    identity: str

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: list[str] | None = None, progress: bool = True) -> list[str]: ...


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A string becomes one user turn; a chat is copied as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def truncate_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string is dropped)."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SafemergeError(f"device {device!r} requested but CUDA is not available", "use --device cpu")
    return device


def bf16_feature(cpuinfo: str, machine: str) -> str | None:
    """The bf16 feature named in a ``/proc/cpuinfo`` text: x86 ``amx_bf16`` or ``avx512_bf16``
    (``flags``), ARM ``bf16`` (``Features``); ``None`` when there is none."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    wanted = ("amx_bf16", "avx512_bf16") if machine.lower() in ("x86_64", "amd64") else ("bf16",)
    return next((f for f in wanted if f in flags), None)


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The feature of this CPU that makes bfloat16 matmuls native (:func:`bf16_feature`), or ``None``.

    With AVX512-BF16 or AMX (x86) or the ARM ``bf16`` extension oneDNN runs bf16 GEMMs natively;
    without one PyTorch emulates bf16 and it is slower than float32, so float32 stays the default.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return bf16_feature(text, platform.machine())


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The compute dtype of generation: the one decision every generating path goes through.

    ``None``/``"auto"``: bfloat16 on CUDA with bf16 support (else float16), bfloat16 on a CPU with
    native bf16 (:func:`cpu_bf16_feature`), float32 otherwise. An explicit name (or alias such as
    ``fp32``) is returned canonicalised; ``float32`` gives exact float32 results.
    """
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu_bf16_feature() else "float32"
    if dtype not in DTYPE_ALIASES:
        raise SafemergeError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    return DTYPE_ALIASES[dtype]


def _physical_memory_bytes(device: Any) -> int:
    """Total memory of ``device`` (a constant of the machine, so the batch size is reproducible)."""

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_batch_size(config: Any, element_bytes: int, prompt_tokens: int, new_tokens: int, device: Any) -> int:
    """Rows per batch so that one batch's KV cache and prefill activations fit in
    :data:`BATCH_MEMORY_FRACTION` of the device's physical memory, capped at
    :data:`MAX_CPU_BATCH` / :data:`MAX_GPU_BATCH`.

    Per row: keys and values of every layer for ``prompt_tokens + new_tokens`` positions
    (``2 · layers · kv_heads · head_dim`` elements per token), plus the prefill activations
    (hidden and MLP states, ``hidden + 2 · intermediate`` elements per prompt token, kept once)
    and one row of float32 logits.
    """
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 4096))
    layers = int(getattr(text, "num_hidden_layers", 32))
    heads = int(getattr(text, "num_attention_heads", 32))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    inter = int(getattr(text, "intermediate_size", 4 * hidden))
    vocab = int(getattr(text, "vocab_size", 32000))
    kv = 2 * layers * kv_heads * head_dim * (prompt_tokens + new_tokens) * element_bytes
    prefill = (hidden + 2 * inter) * prompt_tokens * element_bytes
    per_row = kv + prefill + 4 * vocab
    cap = MAX_GPU_BATCH if device.type == "cuda" else MAX_CPU_BATCH
    return max(1, min(cap, int(BATCH_MEMORY_FRACTION * _physical_memory_bytes(device)) // max(1, per_row)))


def fingerprint_model(model: Any) -> str:
    """A content fingerprint of an in-memory model: SHA-256 over each parameter's name, shape,
    sum and sum of squares (float64). Cheap, deterministic, and changes when any weight does."""

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().to(torch.float64)
            h.update(f"{name}|{tuple(p.shape)}|{t.sum().item():.17g}|{t.square().sum().item():.17g}\n".encode())
    return "mem:" + h.hexdigest()[:32]


# The files whose bytes decide what a model or adapter generates; model cards, logs and reports do not.
_DEFINING_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".model", ".jinja", ".index.json")
_DEFINING_NAMES = frozenset({"config.json", "adapter_config.json", "generation_config.json", "tokenizer.json",
                             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                             "merges.txt"})
# Up to this many bytes of defining files a model is identified by their contents (adapters, tiny models: the same
# weights at another path hit the same cache rows); above it by path, sizes and modification times (hashing a
# multi-gigabyte checkpoint on every evaluation would cost seconds).
CONTENT_IDENTITY_MAX_BYTES = 256 * 2**20


def _defining_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [f for f in files if f.name in _DEFINING_NAMES or f.name.endswith(_DEFINING_SUFFIXES)] or files


def fingerprint_path(path: Path) -> str:
    """Identity of a model or adapter on disk, from the files that define it (weights, configs, tokenizer): the hash
    of their contents when they total at most :data:`CONTENT_IDENTITY_MAX_BYTES` (path-independent: a copy or a
    renamed output is the same model), else the resolved path + their names, sizes and modification times."""
    path = path.resolve()
    files = _defining_files(path)
    stats = [f.stat() for f in files]
    if sum(st.st_size for st in stats) <= CONTENT_IDENTITY_MAX_BYTES:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}|".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            h.update(b"\n")
        return f"sha256:{h.hexdigest()[:32]}"
    h = hashlib.sha256(str(path).encode())
    for f, st in zip(files, stats):
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{path}#{h.hexdigest()[:16]}"


def check_weights(path: Path, allow_pickle: bool) -> None:
    if path.is_file():
        return
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} has no config.json", "pass a Hugging Face model directory")
    has_st = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise CheckpointError(f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded",
                              f"convert it to safetensors or pass {option('allow-pickle')} if you trust the source")


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``batch`` left-padded to its longest row (CPU tensors)."""

    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


#: Rows sharing at least this many first tokens run them once (:meth:`HFGenerator._prefill`); below it the
#: extra forward pass costs more than it saves.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(batch: list[list[int]]) -> int:
    """How many first tokens every row of ``batch`` has in common — at most one less than the shortest row, so
    that every row keeps a token of its own for the forward pass that yields its first logits."""
    limit = min(len(seq) for seq in batch) - 1
    first = batch[0]
    n = 0
    while n < limit and all(seq[n] == first[n] for seq in batch):
        n += 1
    return n


def _cache_argument(model: Any) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (older releases); a PEFT wrapper forwards it to its base model."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    """The KV cache of a forward pass's output, whichever name this transformers release uses."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class HFGenerator:
    """transformers backend: batched greedy decoding with left padding.

    Args:
        model: a ``PreTrainedModel`` (or ``PeftModel``) already on ``device``.
        tokenizer: its tokenizer (chat template used when present).
        identity: the cache identity of the model (+ adapter).
    """

    backend = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, identity: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity or fingerprint_model(model)
        self.device = next(model.parameters()).device
        self._cache_arg = _cache_argument(model)

    # -- prompt rendering -------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """The exact text fed to the model: chat template with the generation prompt, or a plain
        ``User:/Assistant:`` transcript for tokenizers without a template (base models)."""
        msgs = as_messages(prompt)
        if getattr(self.tokenizer, "chat_template", None):
            return render_chat_template(self.tokenizer, msgs, add_generation_prompt=True)
        if len(msgs) == 1 and msgs[0]["role"] == "user":
            return msgs[0]["content"]
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
        return "\n\n".join(lines) + "\n\nAssistant:"

    @property
    def dtype(self) -> str:
        """Name of the compute dtype (``"bfloat16"``, ``"float32"`` …), recorded in results."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def batch_size_for(self, prompt_tokens: int, new_tokens: int) -> int:
        """Rows per batch for prompts of up to ``prompt_tokens`` tokens (:func:`memory_batch_size`)."""
        element = next(self.model.parameters()).element_size()
        return memory_batch_size(self.model.config, element, prompt_tokens, new_tokens, self.device)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_cfg = getattr(self.model, "generation_config", None)
        for src in (getattr(gen_cfg, "eos_token_id", None), self.tokenizer.eos_token_id):
            if src is None:
                continue
            for i in (src if isinstance(src, (list, tuple)) else [src]):
                if i not in ids:
                    ids.append(int(i))
        return ids

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        eos = self._eos_ids()
        return eos[0] if eos else 0

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: list[str] | None = None, progress: bool = True,
                 on_batch: Callable[[list[int], list[str]], None] | None = None,
                 description: str = "generating", skip: Callable[[list[int]], bool] | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` (chat template applied), in input order.

        ``on_batch(indices, texts)`` is called after every batch (the evaluation cache uses it to
        save finished generations as it goes); ``skip``: see :meth:`complete`.
        """
        texts = [self.render(p) for p in prompts]
        special = not bool(getattr(self.tokenizer, "chat_template", None))
        return self.complete(texts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                             progress=progress, add_special_tokens=special, description=description,
                             on_batch=on_batch, skip=skip)

    def complete(self, texts: list[str], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: list[str] | None = None, progress: bool = True, add_special_tokens: bool = True,
                 description: str = "generating",
                 on_batch: Callable[[list[int], list[str]], None] | None = None,
                 skip: Callable[[list[int]], bool] | None = None) -> list[str]:
        """Greedy continuations of raw ``texts`` (no chat template): the primitive judges use.

        Prompts are processed longest first (batches of similar length waste little compute on
        padding); ``batch_size=None`` sizes each batch from memory for its longest prompt. The batches
        depend on ``texts`` alone; a batch whose indices ``skip`` accepts (the caller has their texts) is
        not generated and its rows come back empty, so a resumed run generates what it lacks in the
        batches an uninterrupted one would have used.
        """

        if not texts:
            return []
        encoded = [self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), i))
        results: list[str | None] = [None] * len(texts)
        with progress_bar(description, total=len(texts), enabled=progress, unit="prompts") as bar, \
                torch.inference_mode():
            start = 0
            while start < len(order):
                bs = batch_size or self.batch_size_for(len(encoded[order[start]]), max_new_tokens)
                idx = order[start:start + max(1, int(bs))]
                start += len(idx)
                if skip is not None and skip(list(idx)):
                    bar.advance(n=len(idx))
                    continue
                outs = self._generate_batch([encoded[i] for i in idx], max_new_tokens, stop)
                for i, text in zip(idx, outs):
                    results[i] = text
                if on_batch is not None:
                    on_batch(list(idx), outs)
                bar.advance(n=len(idx))
        return [r if r is not None else "" for r in results]

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int, stop: list[str] | None) -> list[str]:
        """Texts of one batch: :meth:`_decode`, cut at EOS and at the first stop string."""
        return [truncate_at_stop(self.tokenizer.decode(seq, skip_special_tokens=True), stop).strip()
                for seq in self._decode(batch, max_new_tokens, stop)]

    def _decode(self, batch: list[list[int]], max_new_tokens: int, stop: list[str] | None) -> list[list[int]]:
        """Greedy new token ids of each row (EOS excluded), the same as ``model.generate``'s.

        Rows are left-padded; position ids are ``cumsum(mask) - 1`` as in ``generate``. A row that
        emits EOS (or whose text contains a stop string) leaves the batch: its KV-cache rows,
        mask and position are dropped, so the remaining steps cost only what is still running.
        """

        eos = set(self._eos_ids())
        out, mask, positions = self._prefill(batch)
        cache, positions = _returned_cache(out), positions[:, -1:]
        new: list[list[int]] = [[] for _ in batch]
        alive = list(range(len(batch)))  # batch row -> input row
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1, :].argmax(-1)
            keep = []
            for r, token in enumerate(next_ids.tolist()):
                if token not in eos:
                    new[alive[r]].append(token)
                    if not self._hit_stop(new[alive[r]], stop):
                        keep.append(r)
            if step == max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(alive):
                rows = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(rows)
                next_ids, mask, positions = next_ids[rows], mask[rows], positions[rows]
                alive = [alive[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            positions = positions + 1
            out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_arg: cache})
        return new

    def _prefill(self, batch: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The forward pass over the prompts: ``(output with its KV cache, attention mask, position ids)``.

        When the rows share their first :data:`MIN_SHARED_PREFIX` or more tokens (a chat template's system
        turn), those run once and their cache is repeated for every row; each row's own tokens follow,
        left-padded after the prefix (padding masked, positions continuing at the prefix length)."""
        shared = shared_prefix_length(batch) if len(batch) > 1 else 0
        cache = self._prefix_cache(batch[0][:shared], len(batch)) if shared >= MIN_SHARED_PREFIX else None
        if cache is None:
            shared = 0
        ids, own = (t.to(self.device) for t in left_pad([seq[shared:] for seq in batch], self._pad_id()))
        mask = torch.cat([own.new_ones((len(batch), shared)), own], dim=1)
        positions = (own.cumsum(-1) - 1 + shared).masked_fill(own == 0, 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **({self._cache_arg: cache} if cache is not None else {}))
        return out, mask, positions

    def _prefix_cache(self, prefix: list[int], rows: int) -> Any:
        """The KV cache of ``prefix`` (positions ``0 … P−1``) repeated for ``rows`` rows, or ``None`` when this model's
        cache cannot be repeated."""
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        cache = _returned_cache(self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           position_ids=torch.arange(len(prefix), device=self.device)[None],
                                           use_cache=True, logits_to_keep=1))
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(rows)
        return cache

    def _hit_stop(self, tokens: list[int], stop: list[str] | None) -> bool:
        """Whether the decoded ``tokens`` contain a stop string."""
        return bool(stop) and any(s and s in self.tokenizer.decode(tokens, skip_special_tokens=True) for s in stop)


class VLLMGenerator:
    """vLLM backend (optional, GPU): ``LLM.chat`` with greedy ``SamplingParams``; adapters go
    through ``LoRARequest`` (the base weights are never merged)."""

    backend = "vllm"

    def __init__(self, model_path: str, *, adapter: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, identity: str | None = None, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise SafemergeError("--backend vllm needs the vllm package",
                                 "pip install 'safemerge[vllm]' (CUDA only)") from exc

        refuse_custom_code(model_path, trust_remote_code)
        self.adapter = adapter
        kwargs: dict[str, Any] = dict(model=model_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                                      seed=0, **llm_kwargs)
        if adapter:
            import json

            rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
            kwargs.update(enable_lora=True, max_lora_rank=max(8, int(rank)))
        self.llm = LLM(**kwargs)
        self.dtype = dtype or "auto"
        self.identity = identity or model_path
        self.default_batch_size = GPU_BATCH_SIZE

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: list[str] | None = None, progress: bool = True) -> list[str]:  # pragma: no cover - GPU only
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop or None)
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, str(self.adapter))
        outs = self.llm.chat([as_messages(p) for p in prompts], params, lora_request=lora, use_tqdm=progress)
        return [truncate_at_stop(o.outputs[0].text, stop).strip() for o in outs]


def resolve_backend(backend: str, model: Any) -> str:
    """``auto`` → ``vllm`` when vllm is importable, CUDA is present and the model is a path; else ``hf``."""
    if backend not in ("auto", "hf", "vllm"):
        raise SafemergeError(f"unknown backend {backend!r}", "use --backend auto, hf or vllm")
    if backend != "auto":
        return backend
    if not isinstance(model, (str, os.PathLike)) or importlib.util.find_spec("vllm") is None:
        return "hf"

    return "vllm" if torch.cuda.is_available() else "hf"


def _load_hf(model: str, tokenizer: Any, dtype: Any, device: str, options: RunOptions) -> tuple[Any, Any, Path]:
    """The model, its tokenizer and the local path it was loaded from (a Hub id resolved to its snapshot)."""
    path = local_model(model, options=options)
    kw: dict[str, Any] = {}
    check_weights(path, options.allow_pickle)
    refuse_custom_code(path, options.trust_remote_code)
    src = str(path)
    if path.is_file() and path.suffix == ".gguf":
        src, kw["gguf_file"] = str(path.parent), path.name
    try:
        load_kw = dict(kw)
        if "gguf_file" not in kw and not options.allow_pickle:
            load_kw["use_safetensors"] = True
        hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=options.trust_remote_code,
                                                        **load_kw)
        tok = tokenizer or AutoTokenizer.from_pretrained(src, trust_remote_code=options.trust_remote_code, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load model {model}: {' '.join(str(exc).split())[:200]}",
                              "check that the directory is a complete Hugging Face causal-LM checkpoint") from exc
    return hf_model.to(device).eval(), tok, path


def local_model(model: str, *, options: RunOptions | None = None) -> Path:
    """A model reference as a local path (a Hub id becomes its snapshot); a clear error when there is none."""
    path = resolve_local(model, options=options)
    if not path.exists():
        raise CheckpointError(f"model not found: {model}",
                              "pass a local model directory, a .gguf file or a Hub id org/name")
    return path


def split_adapter(model: Any, adapter: str | None) -> tuple[Any, str | None]:
    """``MODEL+ADAPTER`` (mergekit syntax) → ``(MODEL, ADAPTER)``; an explicit ``adapter`` too is an error."""
    if not isinstance(model, (str, os.PathLike)):
        return model, adapter

    base, ref_adapter = split_model_ref(str(model))
    if ref_adapter is None:
        return model, adapter
    if adapter is not None:
        raise SafemergeError(f"two adapters given: {ref_adapter} (in MODEL+ADAPTER) and {adapter} (--adapter)",
                             "give the adapter once, either as MODEL+ADAPTER or with --adapter")
    return base, ref_adapter


def local_adapter(adapter: str) -> Path:
    """A PEFT adapter directory (or Hub id, fetched) as a local path; a clear error when it is not one."""

    path = resolve_local(adapter)
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter} is not a PEFT adapter (no adapter_config.json)" if path.exists()
                              else f"adapter not found: {adapter}",
                              "pass the directory written by save_pretrained of a PeftModel (or its Hub id)")
    return path


def generation_dtype(model: Any, dtype: str | None = None, device: str | None = None) -> str:
    """The dtype :func:`load_generator` will compute in for ``model``, known before loading it:
    an in-memory model's own dtype, else :func:`resolve_dtype` for the resolved device."""
    if not isinstance(model, (str, os.PathLike)):
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    return resolve_dtype(dtype, resolve_device(device))


def model_identity(model: Any, adapter: str | None = None, *, options: RunOptions | None = None) -> str:
    """The cache identity of ``model`` (+ ``adapter``) without loading it: the fingerprint
    (:func:`fingerprint_path`) of its local files — a Hub id's snapshot, fetched if it is not cached, so the
    identity follows the revision's content, not its name — or a weight fingerprint of an in-memory model.
    The one identity every backend's generator carries (:func:`load_generator`)."""
    model, adapter = split_adapter(model, adapter)
    if isinstance(model, (str, os.PathLike)):
        ident = fingerprint_path(local_model(str(model), options=options))
    else:
        ident = fingerprint_model(model)
    if adapter:
        ident += "+" + fingerprint_path(local_adapter(adapter))
    return ident


def load_generator(
    model: Any,
    *,
    tokenizer: Any = None,
    adapter: str | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    identity: str | None = None,
    options: RunOptions | None = None,
) -> Generator:
    """A generator for ``model`` (a path, a ``.gguf`` file, or an already-loaded ``PreTrainedModel``).

    Args:
        model: model directory / GGUF file / hub id, or an in-memory model (then pass ``tokenizer``).
        tokenizer: tokenizer for an in-memory model (default: loaded from the model path).
        adapter: PEFT adapter directory, applied WITHOUT merging (``PeftModel`` / vLLM ``LoRARequest``).
        backend: ``auto`` (vLLM if importable and CUDA present, else transformers), ``hf`` or ``vllm``.
        device: ``cpu``, ``cuda[:N]`` or ``None`` (CUDA if available).
        dtype: ``float32``/``bfloat16``/``float16``; default :func:`resolve_dtype` (bf16 on CUDA and on
            CPUs with native bf16, else float32). An in-memory model runs in its own dtype.
        identity: cache identity to use (default: computed from the path or the weights).
        options: ``trust_remote_code`` (passed to transformers/vLLM) and ``allow_pickle`` (``.bin``/``.pt``
            checkpoints); ``device`` and ``dtype`` above are the generation's own (``None``: chosen for the hardware).
    """
    options = or_default(options)
    model, adapter = split_adapter(model, adapter)
    name = resolve_backend(backend, model)
    if name == "vllm":
        if not isinstance(model, (str, os.PathLike)):
            raise SafemergeError("the vLLM backend needs a model saved on disk",
                                 "save the model first or use --backend hf")
        if identity is None:
            identity = model_identity(model, adapter, options=options)
        return VLLMGenerator(str(model), adapter=adapter, dtype=resolve_dtype(dtype, "cuda") if dtype else None,
                             trust_remote_code=options.trust_remote_code, identity=identity)

    dev = resolve_device(device)
    torch_dtype = getattr(torch, resolve_dtype(dtype, dev))
    local: Path | None = None  # None ⇒ in memory: HFGenerator fingerprints the weights
    if isinstance(model, (str, os.PathLike)):
        hf_model, tok, local = _load_hf(str(model), tokenizer, torch_dtype, dev, options)
    else:
        if tokenizer is None:
            raise SafemergeError("an in-memory model needs its tokenizer",
                                 "pass load_generator(model, tokenizer=...) to evaluate as generator=")
        hf_model, tok = model, tokenizer
    if adapter:
        adapter_path = local_adapter(adapter)
        check_weights(adapter_path, options.allow_pickle)
        from peft import PeftModel

        shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
        label = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
        check_adapter_fits(load_adapter(adapter_path, options=options), shapes.__contains__,
                           shapes.__getitem__, label)

        hf_model = PeftModel.from_pretrained(hf_model, str(adapter_path), is_trainable=False).eval()
    if identity is None and local is not None:  # callers that pass one (evaluate) skip hashing the files again
        identity = model_identity(local, adapter_path if adapter else None, options=options)
    return HFGenerator(hf_model, tok, identity=identity)
