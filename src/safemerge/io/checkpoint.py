"""Lazy, memory-mapped ``name → tensor`` views of Hugging Face model directories.

A :class:`Checkpoint` never loads a whole model: it reads the safetensors headers (single
``model.safetensors`` or shards listed in ``model.safetensors.index.json``), and each
:meth:`Checkpoint.get` call reads exactly one tensor from the memory-mapped file and casts it
(by default to float32). Tied embeddings (``tie_word_embeddings``) expose ``lm_head.weight``
as an alias of the input embedding. Pickle checkpoints (``.bin``/``.pt``) are refused unless
``RunOptions(allow_pickle=True)``, and then read with ``torch.load(weights_only=True)``.

Layer structure is discovered from tensor names (``<prefix>.<index>.<rest>``), so Llama,
Mistral, Qwen2 (with q/k/v biases), Gemma and Phi-3 layouts all work without a table.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from safemerge.errors import CheckpointError, option
from safemerge.io.hub import resolve_local, split_model_ref  # noqa: F401  (split_model_ref re-exported)
from safemerge.options import RunOptions, or_default

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")

_READ_CHUNK = 16 << 20  # bytes copied out of the mapping at a time

_LAYER_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_GENERIC_LAYER_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rest>.+)$")

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """Split ``model.layers.3.self_attn.q_proj.weight`` into ``("model.layers", 3, "self_attn.q_proj.weight")``.

    Returns ``None`` for tensors outside the repeated blocks (embeddings, final norm, head).
    """
    m = _LAYER_RE.match(name) or _GENERIC_LAYER_RE.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("idx")), m.group("rest")


def layer_index(name: str) -> int | None:
    """The transformer-block index a tensor belongs to, or ``None``."""
    parts = split_layer_name(name)
    return None if parts is None else parts[1]


_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100_000_000


def require_regular_file(path: Path, what: str = "checkpoint file") -> int:
    """Check, without opening it, that ``path`` (symlinks followed) is a regular file; return its size.

    Opening a named pipe or a character device blocks forever or reads endless bytes, so every
    file a checkpoint names is type-checked with ``stat`` before the first ``open``.
    """

    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path} ({exc.strerror})",
                              "check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{what} {path} is {kind}, not a regular file", "point it at a real checkpoint file")
    return st.st_size


def all_finite(t: "torch.Tensor") -> bool:
    """True when ``t`` has no NaN/Inf. One summation pass (NaN and ±Inf propagate into the sum);
    only when the sum is not finite — a non-finite entry, or a finite overflow — is the exact
    element-wise test run. About 10× cheaper than ``isfinite(t).all()`` on large tensors. Contiguous
    bfloat16 on the CPU: the exponent bits, compiled (:mod:`safemerge.io._bf16`, 5× cheaper than the sum)."""

    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous():
        from safemerge.io._bf16 import bf16_all_finite

        return bf16_all_finite(t)
    if math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(_elementwise_safe(t)).all())


def require_finite(t: "torch.Tensor", name: str, ref: str) -> None:
    """Raise a :class:`CheckpointError` when tensor ``name`` of model ``ref`` holds NaN/Inf (the one message
    for every reader that refuses non-finite inputs)."""

    if not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise CheckpointError(f"tensor {name!r} of {ref} contains {bad} values",
                              f"fix the checkpoint, or pass {option('allow-nonfinite')} to merge it anyway")


def _elementwise_safe(t: "torch.Tensor") -> "torch.Tensor":
    """``t``, widened to float32 for float8 dtypes (torch has no isfinite/isnan for them)."""
    return t.float() if t.element_size() == 1 else t


def refuse_nonfinite(t: "torch.Tensor", name: str, source: Any) -> None:
    """Raise :class:`CheckpointError` when tensor ``name`` of ``source`` holds NaN or Inf."""

    if not all_finite(t):
        bad = "NaN" if bool(torch.isnan(_elementwise_safe(t)).any()) else "Inf"
        raise CheckpointError(f"tensor {name!r} of {source} contains {bad} values",
                              "fix the checkpoint, or pass --allow-nonfinite to use it anyway")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook that refuses duplicate keys (two tensors with one name)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate tensor name {k!r}")
        out[k] = v
    return out


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and validate a safetensors header without touching tensor data.

    The header is the contract for every byte later read from the file, so it is checked once,
    here (see :func:`validate_safetensors_header`); truncated files are reported at open time
    instead of half-way through a merge.
    """

    size = require_regular_file(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > _MAX_HEADER_BYTES:
                raise ValueError("header length exceeds the file size")
            header = json.loads(fh.read(n), object_pairs_hook=_unique_object)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({' '.join(str(exc).split())[:160]})",
            "re-download or re-save the checkpoint; it may be truncated or corrupted",
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header", "re-download or re-save the checkpoint")
    validate_safetensors_header(path, header, size - 8 - n)
    header["__data_start__"] = 8 + n
    return header


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_safetensors_header(path: Path, header: dict[str, Any], data_len: int) -> None:
    """Check every tensor entry of a parsed safetensors header against the file.

    Each entry must have a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` ``[begin, end]`` of integers with ``0 ≤ begin ≤ end ≤ data bytes`` and
    ``end − begin = itemsize(dtype) × ∏ shape``; byte ranges may not overlap. Anything else
    raises :class:`CheckpointError` naming the file and the tensor.
    """
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object", "re-save the checkpoint")
    ranges = sorted((*_entry_byte_range(path, name, info, data_len), name)
                    for name, info in header.items() if name != "__metadata__")
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise _bad_tensor(path, name, f"overlaps tensor {prev!r} (bytes from {begin} are shared)")


def _bad_tensor(path: Path, name: str, problem: str,
                hint: str = "re-download or re-save the checkpoint") -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name!r} {problem}", hint)


def _entry_byte_range(path: Path, name: str, info: Any, data_len: int) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking its dtype, shape and offsets against the file."""

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _bad_tensor(path, name, "has a malformed header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise _bad_tensor(path, name, f"has unknown dtype {str(dtype)[:20]!r}",
                          f"supported dtypes: {', '.join(_ST_ITEMSIZE)}; convert the checkpoint")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad_tensor(path, name, f"has an invalid shape {str(shape)[:40]} (needs non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad_tensor(path, name, f"has invalid data_offsets {str(offsets)[:40]} (needs two integers)")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _bad_tensor(path, name, f"has invalid data_offsets [{begin}, {end}] (negative or reversed)")
    if end > data_len:
        raise _bad_tensor(path, name, f"ends at byte {end} but the file holds {data_len} data bytes (truncated)")
    expected = _ST_ITEMSIZE[dtype] * math.prod(shape)
    if end - begin != expected:
        raise _bad_tensor(path, name, f"spans {end - begin} bytes but {dtype} × {shape} needs {expected}")
    return begin, end


def _shard_path(model_dir: Path, index: Path, shard: Any) -> Path:
    """The file an index's ``weight_map`` names: a relative path that stays inside ``model_dir``."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index} names a shard that is not a file name ({str(shard)[:40]!r})",
                              "re-save the checkpoint")
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{index} names shard {shard!r} outside the model directory",
                              "shards must be files inside the model directory; re-save the checkpoint")
    return model_dir / rel


def _read_weight_map(idx: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (safetensors or pickle), a regular file holding a JSON object."""
    require_regular_file(idx, "shard index")
    try:
        wm = json.loads(idx.read_text())["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{idx} is malformed ({exc})", "re-save the checkpoint") from exc
    return wm


def _refuse_non_model_directory(p: Path) -> None:
    """The error for a directory without weights: an adapter, a GGUF folder, or something else."""
    if (p / "adapter_config.json").exists():
        raise CheckpointError(
            f"{p} is a LoRA adapter, not a model",
            f"reference it together with its base model as BASE+{p}",
        )
    if any(p.glob("*.gguf")):
        raise CheckpointError(f"{p} holds a GGUF file, not safetensors",
                              "convert it first with: safemerge convert FILE.gguf OUT_DIR")
    raise CheckpointError(f"{p} is not a model directory (no model.safetensors or index found)",
                          "pass a Hugging Face model directory")


class Checkpoint(Mapping):
    """A lazy mapping from tensor name to tensor over one Hugging Face model directory.

    Args:
        path: a model directory (``config.json`` + safetensors), or a single ``.safetensors`` file.
        options: ``allow_pickle`` permits ``.bin``/``.pt`` checkpoints (read with ``weights_only=True``);
            ``allow_nonfinite`` returns tensors holding NaN/Inf instead of refusing them on read.

    ``ckpt[name]`` returns the tensor in its stored dtype; :meth:`get` casts (float32 by default).
    """

    def __init__(self, path: str | Path, *, options: RunOptions | None = None) -> None:
        self.options = or_default(options)
        self.path = resolve_local(path, options=self.options)  # Hub ids → their local snapshot
        if not self.path.exists():
            raise CheckpointError(f"model path {str(self.path)!r} does not exist", "check the path")
        self._lock = threading.Lock()
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        self._pickled: dict[Path, dict[str, Any]] = {}
        self._weight_map: dict[str, Path] = {}
        self._headers: dict[Path, dict[str, Any]] = {}
        self.format = "safetensors"
        self._discover()
        self.aliases: dict[str, str] = {}
        if self.tie_word_embeddings and "lm_head.weight" not in self._weight_map:
            emb = self.embedding_name
            if emb is not None:
                self.aliases["lm_head.weight"] = emb

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> None:
        """Find the weight files: a single file, a safetensors index, ``model.safetensors``, loose shards, pickles."""
        p = self.path
        if p.is_file():
            self._discover_file(p)
            return
        idx = p / SAFETENSORS_INDEX
        if idx.exists():
            self._discover_index(idx)
            return
        single = p / SAFETENSORS_SINGLE
        if single.exists():
            self._add_safetensors(single)
            return
        others = sorted(p.glob("*.safetensors"))
        if others and not (p / "adapter_config.json").exists():
            for sp in others:
                self._add_safetensors(sp)
            return
        pidx = p / PICKLE_INDEX
        pickles = [p / n for n in PICKLE_SINGLE if (p / n).exists()]
        if pidx.exists():
            for shard in sorted(set(_read_weight_map(pidx).values()), key=str):
                self._add_pickle(_shard_path(p, pidx, shard))
            return
        if pickles:
            self._add_pickle(pickles[0])
            return
        _refuse_non_model_directory(p)

    def _discover_file(self, p: Path) -> None:
        """A checkpoint given as one file: safetensors or (with ``allow_pickle``) a pickle."""
        if p.suffix == ".safetensors":
            self._add_safetensors(p)
            return
        if p.suffix in (".bin", ".pt", ".pth"):
            self._add_pickle(p)
            return
        if p.suffix == ".gguf":
            raise CheckpointError(f"{p} is a GGUF file", f"convert it first: safemerge convert {p} OUT_DIR")
        raise CheckpointError(f"{p} is not a model directory or a .safetensors file",
                              "pass a Hugging Face model directory")

    def _discover_index(self, idx: Path) -> None:
        """Sharded safetensors: every shard the index names must exist and hold the tensors listed for it."""
        p = self.path
        wm = _read_weight_map(idx)
        shards = {shard: _shard_path(p, idx, shard) for shard in wm.values()}
        for shard, sp in sorted(shards.items()):
            if not sp.exists():
                raise CheckpointError(f"shard {shard} listed in {idx.name} is missing from {p}",
                                      "re-download the checkpoint")
            self._add_safetensors(sp)
        missing = [k for k, v in wm.items() if k not in self._headers[shards[v]]]
        if missing:
            raise CheckpointError(f"{idx.name} lists tensor {missing[0]!r} but its shard does not contain it",
                                  "re-save the checkpoint")

    def _add_safetensors(self, path: Path) -> None:
        header = _read_safetensors_header(path)
        self._headers[path] = header
        for k in header:
            if k not in ("__metadata__", "__data_start__"):
                self._weight_map.setdefault(k, path)

    def _add_pickle(self, path: Path) -> None:
        if not self.options.allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle checkpoint, which can execute code when loaded",
                f"convert it to safetensors, or pass {option('allow-pickle')} to load it with "
                "torch.load(weights_only=True)",
            )
        if not path.exists():
            raise CheckpointError(f"pickle shard {path} is missing", "re-download the checkpoint")
        require_regular_file(path)

        self.format = "pickle"
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types here
            raise CheckpointError(f"cannot load {path} with weights_only=True ({type(exc).__name__})",
                                  "convert the checkpoint to safetensors") from exc
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict", "pass a checkpoint saved with save_pretrained")
        self._pickled[path] = sd
        self._headers[path] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                               for k, v in sd.items() if hasattr(v, "shape")}
        for k in self._headers[path]:
            self._weight_map.setdefault(k, path)

    # ------------------------------------------------------------------ metadata
    @cached_property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.json`` (empty when absent)."""
        cfg = self.path / "config.json" if self.path.is_dir() else self.path.parent / "config.json"
        if not cfg.exists():
            return {}
        require_regular_file(cfg, "config file")
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg} is not valid JSON ({exc})", "fix or re-save config.json") from exc
        return data if isinstance(data, dict) else {}

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.config
        tie = cfg.get("tie_word_embeddings")
        if tie is None and isinstance(cfg.get("text_config"), dict):
            tie = cfg["text_config"].get("tie_word_embeddings")
        return bool(tie) if tie is not None else False

    @cached_property
    def embedding_name(self) -> str | None:
        """Name of the input embedding matrix (``*embed_tokens.weight``, ``*wte.weight`` …)."""
        for n in self._weight_map:
            if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")):
                return n
        return None

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @cached_property
    def num_layers(self) -> int:
        """Number of repeated blocks, from ``num_hidden_layers`` or the tensor names."""
        n = self.config.get("num_hidden_layers")
        if isinstance(n, int):
            return n
        idx = [layer_index(k) for k in self._weight_map]
        idx = [i for i in idx if i is not None]
        return max(idx) + 1 if idx else 0

    def names(self) -> list[str]:
        """Stored tensor names in file order (aliases such as a tied ``lm_head`` excluded)."""
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def _resolve(self, name: str) -> tuple[str, Path]:
        real = self.aliases.get(name, name)
        try:
            return real, self._weight_map[real]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}",
                                  "check that all models share one architecture") from None

    def shape(self, name: str) -> tuple[int, ...]:
        real, f = self._resolve(name)
        return tuple(self._headers[f][real]["shape"])

    def dtype_name(self, name: str) -> str:
        """Stored dtype as a torch dtype name (``float32``, ``bfloat16`` …)."""
        real, f = self._resolve(name)
        d = self._headers[f][real]["dtype"]
        return _ST_DTYPES.get(d, d.replace("torch.", ""))

    def nbytes(self, name: str) -> int:
        sizes = {"float64": 8, "float32": 4, "int64": 8, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}
        return math.prod(self.shape(name)) * sizes.get(self.dtype_name(name), 1)

    # ------------------------------------------------------------------ tensors
    def _mmap(self, path: Path):
        mm = self._handles.get(path)
        if mm is None:
            import mmap

            with self._lock:
                mm = self._handles.get(path)
                if mm is None:
                    try:
                        with path.open("rb") as fh:
                            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    except (OSError, ValueError) as exc:
                        raise CheckpointError(f"cannot open {path} ({exc})",
                                              "check the file and its permissions") from exc
                    self._handles[path] = mm
        return mm

    def _locate(self, path: Path, name: str,
                rows: tuple[int, int] | None = None) -> tuple[int, int, Any, tuple[int, ...]]:
        """File offset, byte count, torch dtype and shape of a stored tensor (or of rows of it)."""

        info = self._headers[path][name]
        begin, end = info["data_offsets"]
        off = self._headers[path]["__data_start__"] + begin
        nbytes = end - begin
        dt_name = _ST_DTYPES.get(info["dtype"])
        if dt_name is None:
            raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}",
                                  "convert the checkpoint to float32/bfloat16/float16")
        shape = tuple(info["shape"])
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            off += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        return off, nbytes, getattr(torch, dt_name), shape

    def _read_into(self, path: Path, off: int, dst: "torch.Tensor") -> None:
        """Fill the uint8 tensor ``dst`` with the file's bytes from ``off``.

        ``pread`` copies straight from the OS page cache (a second read is free) and maps no
        pages into this process, so streaming a 100 GB model keeps RSS at the size of the
        tensors in flight. (A memory-mapped copy leaves the pages the kernel maps around each
        fault resident — measured: 22 % of the inputs of a 135M TIES merge.) Without ``pread``
        (Windows) the bytes are copied out of a memory map in chunks, each released after use.
        """
        view = memoryview(dst.numpy())
        if hasattr(os, "preadv"):
            done = 0
            while done < len(view):
                n = os.preadv(self._fd(path), [view[done:]], off + done)
                if n <= 0:
                    raise CheckpointError(f"{path} ends before its header says (truncated?)",
                                          "re-download the checkpoint")
                done += n
            return

        mm = self._mmap(path)
        for lo in range(0, len(view), _READ_CHUNK):
            hi = min(len(view), lo + _READ_CHUNK)
            view[lo:hi] = np.frombuffer(mm, dtype=np.uint8, count=hi - lo, offset=off + lo)
            a = (off + lo) - (off + lo) % mmap.PAGESIZE
            try:
                mm.madvise(mmap.MADV_DONTNEED, a, off + hi - a)
            except (OSError, ValueError, AttributeError):
                pass

    def _fd(self, path: Path) -> int:
        """A read-only descriptor of ``path`` for positional reads (shared by threads)."""
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = self._fds[path] = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise CheckpointError(f"cannot open {path} ({exc})",
                                              "check the file and its permissions") from exc
        return fd

    def _read_safetensors(self, path: Path, name: str, rows: tuple[int, int] | None = None):
        """Read one tensor (or rows of it) in its stored dtype."""

        off, nbytes, dtype, shape = self._locate(path, name, rows)
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._read_into(path, off, out)
        return out.view(dtype).reshape(shape)

    def __getitem__(self, name: str):
        real, f = self._resolve(name)
        if f in self._pickled:
            t = self._pickled[f][real]
        else:
            try:
                t = self._read_safetensors(f, real)
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read tensor {real!r} from {f} ({exc})",
                                      "the file may be corrupted; re-download it") from exc
        if not self.options.allow_nonfinite:
            refuse_nonfinite(t, real, self.path)
        return t

    def get_rows(self, name: str, start: int, stop: int, dtype: Any = "float32"):
        """Rows ``[start, stop)`` of a tensor (first dimension), read without the rest of it."""

        real, f = self._resolve(name)
        if f in self._pickled:
            t = self._pickled[f][real][start:stop]
        else:
            t = self._read_safetensors(f, real, rows=(start, stop))
        if not self.options.allow_nonfinite:
            refuse_nonfinite(t, real, self.path)
        if dtype is not None and t.is_floating_point():
            t = t.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return t

    def copy_rows(self, name: str, start: int, stop: int, out: "torch.Tensor") -> "torch.Tensor":
        """Rows ``[start, stop)`` converted into ``out`` (shape ``(stop-start, *rest)``): read
        into a block-sized buffer and converted in one pass, without a tensor-sized allocation.
        Values are not checked for NaN/Inf (the engine checks the converted block itself)."""

        real, f = self._resolve(name)
        if f in self._pickled:
            return out.copy_(self._pickled[f][real][start:stop])
        off, nbytes, dtype, _ = self._locate(f, real, (start, stop))
        if dtype == out.dtype and out.is_contiguous():  # nothing to convert: read straight into ``out``
            if nbytes:
                self._read_into(f, off, out.view(-1).view(torch.uint8))
            return out
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._read_into(f, off, raw)
        return out.copy_(raw.view(dtype).view(out.shape))

    def get(self, name: str, dtype: Any = "float32", device: str = "cpu"):  # type: ignore[override]
        """Read one tensor and cast it (float32 by default; ``dtype=None`` keeps the stored dtype)."""

        t = self[name]
        if dtype is not None:
            td = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if t.is_floating_point():
                t = t.to(td)
        if device != "cpu":
            t = t.to(device)
        return t

    def close(self) -> None:
        for mm in self._handles.values():
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)})"


# ---------------------------------------------------------------------- custom model code
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def custom_code_entry(model_dir: str | Path) -> str | None:
    """The first file of ``model_dir`` that asks transformers to import Python code from the
    directory (an ``auto_map`` entry), or ``None``. Only JSON is read; nothing is imported."""
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        return None
    for name in _CODE_CONFIGS:
        f = d / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable JSON is reported by the loader that needs it
        if isinstance(data, dict) and data.get("auto_map"):
            return name
    return None


def refuse_custom_code(model_dir: str | Path, trust_remote_code: bool) -> None:
    """Refuse a model directory that needs its own Python code, unless ``--trust-remote-code``.

    Called before every transformers load (model, tokenizer, config), so transformers never gets
    to ask "Do you wish to run the custom code? [y/N]" on a terminal or read the answer from stdin.
    """
    if trust_remote_code:
        return
    entry = custom_code_entry(model_dir)
    if entry is not None:
        raise CheckpointError(
            f"{model_dir} needs custom Python code from the model directory (auto_map in {entry}); it was not run",
            "pass --trust-remote-code only if you trust the code's author, "
            "or use a model transformers supports natively",
        )
