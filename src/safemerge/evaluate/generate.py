"""Generation backends behind one interface: transformers (batched, left-padded) and vLLM.

:func:`load_generator` returns a :class:`Generator` whose :meth:`~HFGenerator.generate` takes
plain strings (each becomes one user turn) or chats (lists of ``{role, content}``), applies the
model's chat template, decodes greedily and returns only the new text, truncated at the first
stop string.

Batched generation equals one-at-a-time generation: prompts are left-padded, the attention mask
hides the padding and ``generate`` derives position ids from the mask (``cumsum(mask) - 1``), so
every row sees exactly the positions and keys it would see alone. In float32 on CPU the token
ids match exactly (tested in ``tests/test_eval_generate.py``); in bf16/fp16 the different
matmul shapes of a padded batch can flip a near-tie argmax, as with any batched inference.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from safemerge.errors import CheckpointError, SafemergeError

Prompt = str | list[dict[str, str]]

CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 64


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


def _progress(total: int, description: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)
    return prog, description, total


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SafemergeError(f"device {device!r} requested but CUDA is not available", "use --device cpu")
    return device


def _resolve_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in table:
        raise SafemergeError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    return table[dtype]


def fingerprint_model(model: Any) -> str:
    """A content fingerprint of an in-memory model: SHA-256 over each parameter's name, shape,
    sum and sum of squares (float64). Cheap, deterministic, and changes when any weight does."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().to(torch.float64)
            h.update(f"{name}|{tuple(p.shape)}|{t.sum().item():.17g}|{t.square().sum().item():.17g}\n".encode())
    return "mem:" + h.hexdigest()[:32]


def fingerprint_path(path: Path) -> str:
    """Identity of a model on disk: resolved path + name/size/mtime of its files (weights change ⇒ new id)."""
    path = path.resolve()
    h = hashlib.sha256(str(path).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{path}#{h.hexdigest()[:16]}"


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if path.is_file():
        return
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} has no config.json", "pass a Hugging Face model directory")
    has_st = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise CheckpointError(f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded",
                              "convert it to safetensors or pass --allow-pickle if you trust the source")


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

    # -- prompt rendering -------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """The exact text fed to the model: chat template with the generation prompt, or a plain
        ``User:/Assistant:`` transcript for tokenizers without a template (base models)."""
        msgs = as_messages(prompt)
        if getattr(self.tokenizer, "chat_template", None):
            from safemerge.io.chat import render_chat_template

            return render_chat_template(self.tokenizer, msgs, add_generation_prompt=True)
        if len(msgs) == 1 and msgs[0]["role"] == "user":
            return msgs[0]["content"]
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
        return "\n\n".join(lines) + "\n\nAssistant:"

    @property
    def default_batch_size(self) -> int:
        return GPU_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE

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
                 description: str = "generating") -> list[str]:
        """Greedy continuations of ``prompts`` (chat template applied), in input order.

        ``on_batch(indices, texts)`` is called after every batch (the evaluation cache uses it to
        save finished generations as it goes).
        """
        texts = [self.render(p) for p in prompts]
        special = not bool(getattr(self.tokenizer, "chat_template", None))
        return self.complete(texts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                             progress=progress, add_special_tokens=special, description=description,
                             on_batch=on_batch)

    def complete(self, texts: list[str], *, max_new_tokens: int = 128, batch_size: int | None = None,
                 stop: list[str] | None = None, progress: bool = True, add_special_tokens: bool = True,
                 description: str = "generating",
                 on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
        """Greedy continuations of raw ``texts`` (no chat template): the primitive judges use."""
        import torch

        if not texts:
            return []
        bs = max(1, int(batch_size or self.default_batch_size))
        encoded = [self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        # Longest first: batches of similar length waste little compute on padding.
        order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), i))
        results: list[str | None] = [None] * len(texts)
        prog, desc, total = _progress(len(texts), description, progress)
        with prog, torch.inference_mode():
            task = prog.add_task(desc, total=total)
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                outs = self._generate_batch([encoded[i] for i in idx], max_new_tokens, stop)
                for i, text in zip(idx, outs):
                    results[i] = text
                if on_batch is not None:
                    on_batch(list(idx), outs)
                prog.advance(task, len(idx))
        return [r if r is not None else "" for r in results]

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int, stop: list[str] | None) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        pad = self._pad_id()
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad, eos_token_id=self._eos_ids() or None)
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, stop, width)]) if stop else None
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=gen_cfg, stopping_criteria=criteria)
        new = out[:, width:].tolist()
        eos = set(self._eos_ids())
        texts = []
        for seq in new:
            cut = next((k for k, t in enumerate(seq) if t in eos), len(seq))
            texts.append(truncate_at_stop(self.tokenizer.decode(seq[:cut], skip_special_tokens=True), stop).strip())
        return texts


class _StopStrings:
    """Stopping criterion: a row is finished once its decoded new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.width = tokenizer, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = [any(s in self.tokenizer.decode(row[self.width:], skip_special_tokens=True) for s in self.stop)
                for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class VLLMGenerator:
    """vLLM backend (optional, GPU): ``LLM.chat`` with greedy ``SamplingParams``; adapters go
    through ``LoRARequest`` (the base weights are never merged)."""

    backend = "vllm"

    def __init__(self, model_path: str, *, adapter: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, identity: str | None = None, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise SafemergeError("--backend vllm needs the vllm package", "pip install 'safemerge[vllm]' (CUDA only)") from exc
        from safemerge.io.checkpoint import refuse_custom_code

        refuse_custom_code(model_path, trust_remote_code)
        self.adapter = adapter
        kwargs: dict[str, Any] = dict(model=model_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                                      seed=0, **llm_kwargs)
        if adapter:
            import json

            rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
            kwargs.update(enable_lora=True, max_lora_rank=max(8, int(rank)))
        self.llm = LLM(**kwargs)
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
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def _load_hf(model: str, tokenizer: Any, dtype: Any, device: str, trust_remote_code: bool,
             allow_pickle: bool) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.io.checkpoint import refuse_custom_code

    path = Path(model).expanduser()
    kw: dict[str, Any] = {}
    if path.exists():
        _check_weights(path, allow_pickle)
        refuse_custom_code(path, trust_remote_code)
        identity = fingerprint_path(path)
        src = str(path)
        if path.is_file() and path.suffix == ".gguf":
            src, kw["gguf_file"] = str(path.parent), path.name
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in model:
        raise CheckpointError(f"model not found: {model}", "pass a local model directory (hub download is off offline)")
    else:
        src, identity = model, f"hub:{model}"
    try:
        load_kw = dict(kw)
        if "gguf_file" not in kw and not allow_pickle:
            load_kw["use_safetensors"] = True
        hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        **load_kw)
        tok = tokenizer or AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load model {model}: {' '.join(str(exc).split())[:200]}",
                              "check that the directory is a complete Hugging Face causal-LM checkpoint") from exc
    return hf_model.to(device).eval(), tok, identity


def model_identity(model: Any, adapter: str | None = None) -> str:
    """The cache identity of ``model`` (+ ``adapter``) without loading it: a path fingerprint
    (:func:`fingerprint_path`), ``hub:ID``, or a weight fingerprint of an in-memory model."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model).expanduser()
        ident = fingerprint_path(p) if p.exists() else f"hub:{model}"
    else:
        ident = fingerprint_model(model)
    if adapter:
        ident += "+" + fingerprint_path(Path(adapter).expanduser())
    return ident


def load_generator(
    model: Any,
    *,
    tokenizer: Any = None,
    adapter: str | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    identity: str | None = None,
) -> Generator:
    """A generator for ``model`` (a path, a ``.gguf`` file, or an already-loaded ``PreTrainedModel``).

    Args:
        model: model directory / GGUF file / hub id, or an in-memory model (then pass ``tokenizer``).
        tokenizer: tokenizer for an in-memory model (default: loaded from the model path).
        adapter: PEFT adapter directory, applied WITHOUT merging (``PeftModel`` / vLLM ``LoRARequest``).
        backend: ``auto`` (vLLM if importable and CUDA present, else transformers), ``hf`` or ``vllm``.
        device: ``cpu``, ``cuda[:N]`` or ``None`` (CUDA if available).
        dtype: ``float32``/``bfloat16``/``float16``; default fp32 on CPU, bf16 on CUDA.
        trust_remote_code: passed to transformers/vLLM; off by default.
        allow_pickle: accept ``.bin``/``.pt`` checkpoints.
        identity: cache identity to use (default: computed from the path or the weights).
    """
    name = resolve_backend(backend, model)
    if name == "vllm":
        if not isinstance(model, (str, os.PathLike)):
            raise SafemergeError("the vLLM backend needs a model saved on disk", "save the model first or use --backend hf")
        ident = fingerprint_path(Path(model)) if Path(model).exists() else str(model)
        if adapter:
            ident += "+" + fingerprint_path(Path(adapter))
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        return VLLMGenerator(str(model), adapter=adapter, dtype=aliases.get(dtype or "", dtype),
                             trust_remote_code=trust_remote_code, identity=identity or ident)

    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    computed: str | None = None  # None ⇒ HFGenerator fingerprints the in-memory weights
    if isinstance(model, (str, os.PathLike)):
        hf_model, tok, computed = _load_hf(str(model), tokenizer, torch_dtype, dev, trust_remote_code, allow_pickle)
    else:
        if tokenizer is None:
            raise SafemergeError("an in-memory model needs its tokenizer", "pass tokenizer=... to load_generator/evaluate")
        hf_model, tok = model, tokenizer
    if adapter:
        adapter_path = Path(adapter).expanduser()
        if not (adapter_path / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter} is not a PEFT adapter (no adapter_config.json)",
                                  "pass the directory written by save_pretrained of a PeftModel")
        _check_weights(adapter_path, allow_pickle)
        from peft import PeftModel

        from safemerge.io.adapter import check_adapter_fits, load_adapter

        shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
        label = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
        check_adapter_fits(load_adapter(adapter_path, allow_pickle=allow_pickle), shapes.__contains__,
                           shapes.__getitem__, label)

        hf_model = PeftModel.from_pretrained(hf_model, str(adapter_path), is_trainable=False).eval()
        if computed is not None:
            computed += "+" + fingerprint_path(adapter_path)
    return HFGenerator(hf_model, tok, identity=identity or computed)
