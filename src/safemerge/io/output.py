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
import math
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from safemerge.errors import SafemergeError, option
from safemerge.io.checkpoint import split_model_ref

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
_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                "uint8": 1, "bool": 1}


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
            remove_path(p)
            removed.append(p)
    return removed


def _input_locations(ref: str | os.PathLike[str]) -> list[Path]:
    """The existing filesystem paths behind one input reference (``MODEL+ADAPTER`` gives two).

    References that name nothing on disk (hub ids, ``builtin:`` sets) cannot be destroyed and
    are skipped.
    """

    model, adapter = split_model_ref(os.fspath(ref))
    parts = [model] if adapter is None else [model, adapter]
    return [Path(p).expanduser() for p in parts if os.path.lexists(Path(p).expanduser())]


def check_not_an_input(out: str | Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output path that equals, contains or lies inside an input (symlinks resolved).

    Writing there would replace (``--force``), delete or pollute an input, so it is refused
    whatever the flags: this is the one check every writer runs before doing any work.
    """
    target = Path(os.path.abspath(Path(out).expanduser())).resolve()
    for ref in inputs:
        if not isinstance(ref, (str, os.PathLike)):
            continue  # None, an in-memory model, a record list
        for loc in _input_locations(ref):
            src = loc.absolute().resolve()
            if target == src:
                relation = "is"
            elif src.is_relative_to(target):
                relation = "contains"
            elif target.is_relative_to(src):
                relation = "lies inside"
            else:
                continue
            raise SafemergeError(
                f"output {str(out)!r} {relation} the input {str(ref)!r}",
                "choose an output path outside every input (inputs are never replaced, not even with --force)",
            )


def check_writable_location(out: Path, shown: str | Path) -> None:
    """Refuse an output whose nearest existing ancestor is not a writable directory."""
    probe = out.parent
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "not a directory" if not probe.is_dir() else "permission denied"
        raise SafemergeError(f"cannot write {str(shown)!r}: {str(probe)!r} is {why}",
                             "choose an output location you can write to")


def check_output_path(path: str | Path, *, force: bool = False,
                      inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Validate an output location before any work starts: not an input, exists?, writable?

    A symlink counts as existing even when it dangles (``--force`` replaces the link itself,
    never its target).
    """
    out = Path(path).expanduser().absolute()
    check_not_an_input(out, inputs)
    exists = os.path.lexists(out)
    if exists and not force:
        what = "already exists (a dangling symlink)" if not out.exists() else "already exists"
        raise SafemergeError(f"output {str(path)!r} {what}",
                             f"pass {option('force')} to replace it, or choose another path")
    if out.exists() and not out.is_dir():
        raise SafemergeError(f"output {str(path)!r} exists and is not a directory", "choose another path")
    check_writable_location(out, path)
    return out


def check_output_file(path: str | Path, *, force: bool = False,
                      inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """:func:`check_output_path` for a single output file (JSONL, JSON, CSV, PNG …)."""
    out = Path(path).expanduser().absolute()
    check_not_an_input(out, inputs)
    if out.is_dir():
        raise SafemergeError(f"output {str(path)!r} is a directory", "give a file name")
    if os.path.lexists(out) and not force:
        raise SafemergeError(f"output {str(path)!r} already exists",
                             f"pass {option('force')} to replace it, or choose another path")
    check_writable_location(out, path)
    return out


@contextlib.contextmanager
def atomic_output(path: str | Path, *, force: bool = False,
                  inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``path`` is left untouched. With ``force`` an existing ``path`` is replaced. ``inputs``
    are the command's input paths: an output that is, contains or lies in one is refused.
    """
    out = check_output_path(path, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    token = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{token}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise SafemergeError(f"cannot create {tmp.parent} ({exc.strerror})",
                             "choose an output location you can write to") from exc
    try:
        yield tmp
        promote_directory(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote_directory(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename a finished temporary directory to ``out``; with ``force`` an existing ``out`` is
    moved aside first and deleted after the rename, so ``out`` is never half-written."""
    if os.path.lexists(out):
        if not force:
            raise SafemergeError(f"output {str(out)!r} appeared while working", f"pass {option('force')} to replace it")
        old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


def remove_path(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (the link only, never its target)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
def user_file_mode() -> int:
    """The mode a new file gets under the user's umask (``0o644`` with the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def chmod_to_umask(directory: str | Path) -> None:
    """Give every file in ``directory`` the user's default mode (libraries such as transformers and
    tempfile create some files 0600, which would make one output directory's files inconsistent)."""
    mode = user_file_mode()
    for f in Path(directory).iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def _temporary_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary sibling + rename (created with the user's umask)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(p)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` to a temporary sibling, renamed into place (user's umask; PNG by default)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(p)
    try:
        fig.savefig(tmp, **{"format": "png", **savefig_kwargs})
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def tensor_bytes(t) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor."""

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
        self._rows_written: dict[str, int] = {}
        self._plan = None
        if plan is not None:
            self._setup_plan(plan, plan_dtypes or {})

    # ------------------------------------------------------------- planned mode
    def _setup_plan(self, plan: Sequence[tuple[str, Sequence[int]]], plan_dtypes: Mapping[str, str]) -> None:
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
            fd = os.open(self.out_dir / fname, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)  # umask applies
            os.write(fd, struct.pack("<Q", len(hb)) + hb)
            os.ftruncate(fd, 8 + len(hb) + off)
            self._fds.append(fd)
            base = 8 + len(hb)
            for name, shape, dt, nbytes in shard:
                start = header[name]["data_offsets"][0]
                self._plan[name] = (len(self._fds) - 1, base + start, shape, dt, fname)
            self._shards.append([s[0] for s in shard])
        self._shard_names = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                             for i in range(n)]

    def add(self, name: str, tensor) -> None:
        """Store one tensor (cast to the writer's dtype)."""

        if self._plan is not None:
            fd_i, offset, shape, dt, _ = self._planned(name)
            t = tensor.to(getattr(torch, dt))
            if tuple(t.shape) != shape:
                raise RuntimeError(f"tensor {name!r} has shape {tuple(t.shape)}, planned {shape}")
            self._pwrite_all(fd_i, tensor_bytes(t), offset)
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

    def add_rows(self, name: str, rows: tuple[int, int], block) -> None:
        """Store rows ``[r0, r1)`` of planned tensor ``name`` (cast to the planned dtype: a no-op for
        the engine's blocks, narrowed already) at their place in the shard, so that a tensor merged
        in row blocks is never assembled in memory; the tensor counts as written once all its rows are."""

        fd_i, offset, shape, dt, _ = self._planned(name)
        r0, r1 = rows
        block = block.to(getattr(torch, dt))
        if tuple(block.shape) != (r1 - r0, *shape[1:]):
            raise RuntimeError(f"rows {r0}:{r1} of {name!r} have shape {tuple(block.shape)}, planned {shape}")
        row_bytes = block.element_size() * math.prod(shape[1:])
        self._pwrite_all(fd_i, tensor_bytes(block), offset + r0 * row_bytes)
        with self._lock:
            self._rows_written[name] = self._rows_written.get(name, 0) + (r1 - r0)
            if self._rows_written[name] == shape[0]:
                self._written.add(name)

    def _planned(self, name: str) -> tuple[int, int, tuple[int, ...], str, str]:
        """``(shard index, byte offset, shape, dtype, file name)`` of a planned tensor."""
        try:
            return self._plan[name]  # type: ignore[index]
        except KeyError:
            raise RuntimeError(f"tensor {name!r} is not in the write plan") from None

    def _pwrite_all(self, fd_i: int, data: memoryview, offset: int) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(self._fds[fd_i], data[written:], offset + written)

    def _flush(self) -> None:
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
            index = {"metadata": {"total_size": total, **{k: v for k, v in self.metadata.items() if k != "format"}},
                     "weight_map": dict(sorted(weight_map.items()))}
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


def md_code(text: Any, *, in_table: bool = False) -> str:
    """A user-supplied string as a Markdown code span, shown verbatim.

    Backslash escapes do not work inside code spans (CommonMark §6.1: ``\\_`` would be shown as is),
    so nothing is escaped; the span is delimited by one more backtick than the longest run inside
    it. In a table cell a ``|`` still ends the cell, so it is written ``\\|`` (GFM tables unescape it
    before the span is parsed).
    """
    s = " ".join(str(text).split())
    run = max((len(r) for r in re.findall(r"`+", s)), default=0)
    fence = "`" * (run + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    if in_table:
        s = s.replace("|", "\\|")
    return f"{fence}{pad}{s}{pad}{fence}"


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

    fm: dict[str, Any] = {}
    if base_model:
        fm["base_model"] = list(base_model) if not isinstance(base_model, str) else base_model
    fm["library_name"] = library_name
    fm["tags"] = list(tags)
    fm.update(front_matter or {})
    body = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {md_escape(title)}",
            ""]
    for heading, text in sections:
        body += [f"## {md_escape(heading)}", "", text.rstrip(), ""]
    p = Path(out_dir) / "README.md"
    p.write_text("\n".join(body))
    return p
