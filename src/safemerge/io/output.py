"""Crash-safe output: temporary sibling directories, streaming safetensors shards, model cards.

Every command writes into a hidden temporary sibling of its output directory
(``.<name>.safemerge-tmp-<pid>-<token>``) and renames it into place only when everything is
written, so an interrupted or killed run leaves either no output or a complete one. The next
run removes temporaries whose process is gone.

:class:`ShardWriter` writes safetensors files. When the full list of output tensors is known
in advance (``plan``), headers are written first and each tensor is written at its final
offset with ``os.pwrite`` as soon as it is computed — tensors may arrive in any order from a
thread pool, and memory holds only the tensors in flight.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError

TMP_MARK = ".safemerge-tmp-"
OLD_MARK = ".safemerge-old-"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPE_CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by killed runs (their process is gone)."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(out.name)}(?:{re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})(\d+)-[0-9a-f]+$")
    for p in parent.iterdir():
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_output_path(path: str | Path, *, force: bool = False) -> Path:
    """Validate an output location before any work starts (exists? writable?)."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not force:
        raise SafemergeError(f"output {str(path)!r} already exists", "pass --force to replace it, or choose another path")
    if out.exists() and not out.is_dir():
        raise SafemergeError(f"output {str(path)!r} exists and is not a directory", "choose another path")
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SafemergeError(f"cannot write to {str(probe)!r} (permission denied)", "choose an output location you can write to")
    return out


@contextlib.contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``path`` is left untouched. With ``force`` an existing ``path`` is replaced.
    """
    out = check_output_path(path, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{token}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise SafemergeError(f"cannot create {tmp.parent} ({exc.strerror})", "choose an output location you can write to") from exc
    try:
        yield tmp
        promote_directory(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote_directory(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename a finished temporary directory to ``out``; with ``force`` an existing ``out`` is
    moved aside first and deleted after the rename, so ``out`` is never half-written."""
    if out.exists():
        if not force:
            raise SafemergeError(f"output {str(out)!r} appeared while working", "pass --force to replace it")
        old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary sibling + rename."""
    p = Path(path)
    tmp = p.parent / f".{p.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, p)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def tensor_bytes(t) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        arr = t.view(torch.int16).numpy()
    elif t.dtype == torch.bool:
        arr = t.view(torch.uint8).numpy()
    else:
        arr = t.numpy()
    return memoryview(arr).cast("B")


class ShardWriter:
    """Write tensors as ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index.

    Args:
        out_dir: directory to write into (normally a temporary one from :func:`atomic_output`).
        max_shard_bytes: shard size limit in bytes (``--out-shard-size``; default 5 GB).
        dtype: storage dtype (``None`` keeps each tensor's dtype).
        plan: optional ordered ``[(name, shape)]`` of every tensor. With a plan, headers are
            written up front and :meth:`add` streams each tensor straight to its offset
            (thread-safe, any order). Without one, tensors are buffered per shard.
        metadata: extra string metadata for the safetensors headers / index.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_shard_bytes: int = 5_000_000_000,
        dtype: Any = None,
        plan: Sequence[tuple[str, Sequence[int]]] | None = None,
        metadata: Mapping[str, str] | None = None,
        plan_dtypes: Mapping[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = int(max_shard_bytes)
        self.dtype = dtype
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self._lock = threading.Lock()
        self._buffer: list[tuple[str, Any]] = []
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self._plan = None
        if plan is not None:
            self._setup_plan(plan, plan_dtypes or {})

    # ------------------------------------------------------------- planned mode
    def _setup_plan(self, plan: Sequence[tuple[str, Sequence[int]]], plan_dtypes: Mapping[str, str]) -> None:
        import math

        default = _dtype_name(self.dtype) if self.dtype is not None else "float32"
        shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape in plan:
            dt = plan_dtypes.get(name, default)
            nbytes = math.prod(shape) * _DTYPE_SIZES[dt]
            if shards[-1] and size + nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(s) for s in shape), dt, nbytes))
            size += nbytes
        n = len(shards)
        self._plan = {}
        self._fds: list[int] = []
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": self.metadata}
            off = 0
            for name, shape, dt, nbytes in shard:
                header[name] = {"dtype": _DTYPE_CODES[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            fd = os.open(self.out_dir / fname, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
            os.write(fd, struct.pack("<Q", len(hb)) + hb)
            os.ftruncate(fd, 8 + len(hb) + off)
            self._fds.append(fd)
            base = 8 + len(hb)
            for name, shape, dt, nbytes in shard:
                start = header[name]["data_offsets"][0]
                self._plan[name] = (len(self._fds) - 1, base + start, shape, dt, fname)
            self._shards.append([s[0] for s in shard])
        self._shard_names = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def add(self, name: str, tensor) -> None:
        """Store one tensor (cast to the writer's dtype)."""
        import torch

        if self._plan is not None:
            try:
                fd_i, offset, shape, dt, _ = self._plan[name]
            except KeyError:
                raise RuntimeError(f"tensor {name!r} is not in the write plan") from None
            t = tensor.to(getattr(torch, dt))
            if tuple(t.shape) != shape:
                raise RuntimeError(f"tensor {name!r} has shape {tuple(t.shape)}, planned {shape}")
            data = tensor_bytes(t)
            written = 0
            while written < len(data):
                written += os.pwrite(self._fds[fd_i], data[written:], offset + written)
            with self._lock:
                self._written.add(name)
            return
        t = tensor.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype if not isinstance(self.dtype, str) else getattr(torch, self.dtype))
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        with self._lock:
            if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self._buffer.append((name, t))
            self._buffer_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        idx = len(self._shards)
        fname = f"shard-{idx:05d}.tmp.safetensors"
        save_file(dict(self._buffer), str(self.out_dir / fname), metadata=self.metadata)
        self._shards.append([n for n, _ in self._buffer])
        self._buffer = []
        self._buffer_bytes = 0

    def finish(self) -> dict[str, Any]:
        """Close all shards, write the index when sharded; returns the index ``weight_map``."""
        if self._plan is not None:
            missing = [n for n in self._plan if n not in self._written]
            for fd in self._fds:
                os.close(fd)
            if missing:
                raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
            names = self._shard_names
        else:
            self._flush()
            n = len(self._shards)
            names = []
            for i in range(n):
                final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.out_dir / f"shard-{i:05d}.tmp.safetensors", self.out_dir / final)
                names.append(final)
        weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
        if len(names) > 1:
            total = 0
            for f in names:
                total += (self.out_dir / f).stat().st_size
            index = {"metadata": {"total_size": total, **{k: v for k, v in self.metadata.items() if k != "format"}}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def copy_model_files(src_dir: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                     config_updates: Mapping[str, Any] | None = None, copy_tokenizer: bool = True) -> None:
    """Copy ``config.json`` (with ``config_updates``), ``generation_config.json`` and (unless
    ``copy_tokenizer`` is false) the tokenizer files of ``tokenizer_dir`` (default: ``src_dir``).

    Quantisation entries are dropped from the config: the output always holds plain tensors.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    cfg_path = src / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        if config_updates:
            cfg.update(config_updates)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = src / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / gen.name)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else src
    for name in TOKENIZER_FILES if copy_tokenizer else ():
        f = tok / name
        if f.exists():
            shutil.copyfile(f, out / name)


def markdown_section(md: str, default_heading: str = "Evaluation") -> tuple[str, str]:
    """Split a Markdown report that may start with its own ``#`` heading into ``(heading, body)``
    for :func:`write_model_card`."""
    head, _, body = md.strip().partition("\n")
    if head.startswith("#"):
        return head.lstrip("#").strip(), body.strip()
    return default_heading, md.strip()


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|])")


def md_escape(text: Any) -> str:
    """Escape a user-supplied string for inclusion in Markdown (no HTML, links or formatting)."""
    s = " ".join(str(text).split())
    s = s.replace("&", "&amp;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def write_model_card(
    out_dir: str | Path,
    *,
    title: str,
    base_model: str | Sequence[str] | None = None,
    tags: Sequence[str] = ("safemerge", "merge"),
    front_matter: Mapping[str, Any] | None = None,
    sections: Sequence[tuple[str, str]] = (),
    library_name: str = "transformers",
) -> Path:
    """Write ``README.md`` with YAML front-matter (``base_model``, ``tags`` …) and sections.

    ``title`` and section headings are escaped; section bodies are Markdown produced by
    safemerge (callers escape user strings inside them with :func:`md_escape`). The
    front-matter is emitted with ``yaml.safe_dump``, so arbitrary strings cannot break it.
    """
    import yaml

    fm: dict[str, Any] = {}
    if base_model:
        fm["base_model"] = list(base_model) if not isinstance(base_model, str) else base_model
    fm["library_name"] = library_name
    fm["tags"] = list(tags)
    fm.update(front_matter or {})
    body = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {md_escape(title)}", ""]
    for heading, text in sections:
        body += [f"## {md_escape(heading)}", "", text.rstrip(), ""]
    p = Path(out_dir) / "README.md"
    p.write_text("\n".join(body))
    return p
