"""Scale benchmark (issue 16): bf16, sharded, Llama-shaped synthetic models up to 1.2B parameters.

Run through ``bench/merge_speed.py --scale 1b`` or ``--scale 8b-layers`` (see its docstring).
For every model size: four models (a base and three "experts" = base + seeded Gaussian
perturbations, bf16, 1 GB shards with an index) are generated into ``--workdir``; TIES and
linear run through ``safemerge merge`` and ``mergekit-yaml 0.1.5`` with the same YAML in the same
run, warm page cache; the I/O floor is measured in the same run (read every input byte once,
write the output once and ``fsync`` it); peak RSS is each child process's ``ru_maxrss``
(``os.wait4``). The generated models are deleted at the end unless ``--keep``.

Sizes (``--sizes``): ``135m`` (SmolLM2-135M shapes), ``350m``, ``1.2b`` (hidden 2048,
intermediate 8192, 16 layers, vocabulary 32,000: the issue's 1.2B) and ``8b-layers``
(Llama-3.1-8B's largest tensors only: the 128,256 × 4096 embedding and ``lm_head`` plus one
decoder layer with its 14,336-wide MLP — 8B-level per-tensor memory without 48 GB of disk).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model shape."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tie: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight's name and shape, in checkpoint order."""
        h, head_dim = self.hidden, self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def largest(self) -> int:
        return max(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tie, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2,
        }


SHAPES = {
    "135m": Shape(576, 1536, 30, 49152, 9, 3, tie=True),
    "350m": Shape(1024, 4096, 16, 32000, 16, 16),
    "1.2b": Shape(2048, 8192, 16, 32000, 16, 16),
    "8b-layers": Shape(4096, 14336, 1, 128256, 32, 8),
}
SCALES = {"1b": ["135m", "350m", "1.2b"], "8b-layers": ["8b-layers"]}

_POOL = 1 << 24
_CHUNK = 1 << 24


def generate_models(shape: Shape, out: Path, n_experts: int = 3) -> dict[str, Path]:
    """Write a bf16 base and ``n_experts`` perturbed copies (1 GB shards + index) under ``out``.

    Values come from one seeded pool of 2²⁴ standard normals, read at per-tensor offsets (fast to
    generate at 1B+ parameters): base = 0.02·z, expert i = base + 0.001·z' (a 5 % perturbation,
    of the order of bf16 resolution, so bf16 task vectors have many exactly tied magnitudes as
    real ones do). Skips models whose ``config.json`` already exists.
    """
    import torch

    from safemerge.io.output import ShardWriter

    names = ["base"] + [f"expert{i}" for i in range(1, n_experts + 1)]
    paths = {n: out / n for n in names}
    todo = [n for n in names if not (paths[n] / "config.json").exists()]
    if not todo:
        return paths
    pool = torch.randn(_POOL, generator=torch.Generator().manual_seed(0))
    pool = torch.cat([pool, pool])
    plan = shape.tensors()
    tmp = {n: out / f".{n}.tmp" for n in todo}
    writers = {}
    for n in todo:
        shutil.rmtree(tmp[n], ignore_errors=True)
        tmp[n].mkdir(parents=True)
        writers[n] = ShardWriter(tmp[n], plan=plan, dtype="bfloat16", max_shard_bytes=1_000_000_000)
    print(f"generating {', '.join(todo)} ({shape.params() / 1e9:.2f}B parameters each) in {out} …", flush=True)
    for name, shp in plan:
        numel = math.prod(shp)
        bufs = {n: torch.empty(numel, dtype=torch.bfloat16) for n in todo}
        for lo in range(0, numel, _CHUNK):
            m = min(_CHUNK, numel - lo)
            off = zlib.crc32(f"{name}:{lo}".encode()) % _POOL
            base = pool[off : off + m] * 0.02
            for n in todo:
                if n == "base":
                    bufs[n][lo : lo + m] = base
                else:
                    off_n = zlib.crc32(f"{n}:{name}:{lo}".encode()) % _POOL
                    bufs[n][lo : lo + m] = torch.add(base, pool[off_n : off_n + m], alpha=0.001)
        for n in todo:
            writers[n].add(name, bufs[n].view(shp))
    for n in todo:
        writers[n].finish()
        (tmp[n] / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        shutil.rmtree(paths[n], ignore_errors=True)
        os.replace(tmp[n], paths[n])
    return paths


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB of the child: ``ru_maxrss`` via ``wait4``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def io_floor(inputs: list[Path], out_bytes: int, work: Path) -> dict[str, float]:
    """Seconds to read every input shard byte once, and to write ``out_bytes`` once with ``fsync``."""
    buf = bytearray(1 << 24)
    t0 = time.perf_counter()
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    t1 = time.perf_counter()
    target = work / "floor.out"
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
        os.fsync(fh.fileno())
    t2 = time.perf_counter()
    target.unlink()
    return {"read_s": round(t1 - t0, 3), "write_fsync_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}


CONFIGS = {
    "ties": ("merge_method: ties\nbase_model: {base}\nmodels:\n"
             "  - model: {expert1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
             "  - model: {expert2}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
             "  - model: {expert3}\n    parameters: {{weight: 0.2, density: 0.5}}\n"
             "dtype: bfloat16\n"),
    "linear": ("merge_method: linear\nmodels:\n"
               "  - model: {expert1}\n    parameters: {{weight: 0.5}}\n"
               "  - model: {expert2}\n    parameters: {{weight: 0.3}}\n"
               "  - model: {expert3}\n    parameters: {{weight: 0.2}}\n"
               "dtype: bfloat16\n"),
}


def generate_models_apart(shape: Shape, out: Path) -> dict[str, Path]:
    """:func:`generate_models` in a separate, freshly spawned process, so this process stays small.

    Linux carries a process's peak RSS across ``fork`` + ``exec`` into the child's ``ru_maxrss``: had this process
    generated gigabytes of tensors itself, every measured child would report at least that peak (measured: 4452 MB
    for a linear merge whose own peak, under ``/usr/bin/time``, is 291 MB)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(generate_models, (shape, out))


def bench_size(size: str, work: Path, *, jobs: int, mergekit: bool, env: dict[str, str]) -> dict[str, Any]:
    """Generate (or reuse) the models of one size and time both tools on TIES and linear."""
    shape = SHAPES[size]
    paths = generate_models_apart(shape, work / size)
    out_bytes = 2 * shape.params()
    io_floor(list(paths.values()), 0, work)  # warm the page cache
    res: dict[str, Any] = {"params": shape.params(), "largest_tensor_f32_mb": round(4 * shape.largest() / 2**20, 1),
                           "input_model_gb": round(out_bytes / 1e9, 2), "methods": {}}
    for method, tmpl in CONFIGS.items():
        cfg = work / f"{size}_{method}.yml"
        cfg.write_text(tmpl.format(**{k: str(v) for k, v in paths.items()}))
        inputs = [paths[f"expert{i}"] for i in (1, 2, 3)] + ([paths["base"]] if method == "ties" else [])
        floor = min((io_floor(inputs, out_bytes, work) for _ in range(2)), key=lambda f: f["total_s"])
        row: dict[str, Any] = {"io_floor": floor}
        tools = [("safemerge", [str(BIN / "safemerge"), "merge", str(cfg), "{out}", "-j", str(jobs), "--no-progress"])]
        if mergekit:
            tools.append(("mergekit", [str(BIN / "mergekit-yaml"), str(cfg), "{out}"]))
        for tool, cmd in tools:
            out = work / f"out_{size}_{method}_{tool}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {size} {method}: {tool} …", flush=True)
            wall, rss = run_measured([c.replace("{out}", str(out)) for c in cmd], env)
            row[tool] = {"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1)}
        if mergekit:
            row["max_abs_diff"] = max_abs_diff_apart(work / f"out_{size}_{method}_safemerge",
                                                     work / f"out_{size}_{method}_mergekit")
            row["wall_ratio"] = round(row["safemerge"]["wall_s"] / row["mergekit"]["wall_s"], 3)
        row["floor_ratio"] = round(row["safemerge"]["wall_s"] / floor["total_s"], 2)
        row["rss_per_largest_f32"] = round(row["safemerge"]["peak_rss_mb"] / res["largest_tensor_f32_mb"], 2)
        for tool, _ in tools:
            shutil.rmtree(work / f"out_{size}_{method}_{tool}", ignore_errors=True)
        res["methods"][method] = row
    return res


def max_abs_diff_apart(a: Path, b: Path) -> float:
    """:func:`max_abs_diff` in a freshly spawned process: reading two outputs here would raise this process's peak
    RSS to a tensor pair's size, and every child measured afterwards would inherit it as its ``ru_maxrss``
    (measured: the 1.2B linear merge reported 1054 MB after the TIES comparison, 291 MB without it)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(max_abs_diff, (a, b))


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a − b| over all tensors of two model directories, one tensor at a time."""
    from safemerge.io.checkpoint import Checkpoint

    x, y = Checkpoint(a), Checkpoint(b)
    assert set(x.names()) == set(y.names()), sorted(set(x.names()) ^ set(y.names()))[:5]
    return max(float((x.get(n) - y.get(n)).abs().max()) for n in x.names())


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text table of every size × method (the figures docs/benchmarks.md quotes)."""
    head = (f"{'size':>9} {'params':>7} {'method':7} {'safemerge s':>11} {'RSS MB':>7} {'mergekit s':>10} "
            f"{'RSS MB':>7} "
            f"{'ratio':>6} {'I/O floor s':>11} {'×floor':>7} {'RSS/f32':>7} {'max|Δ|':>8}")
    lines = [head, "-" * len(head)]
    for size, r in report["sizes"].items():
        for method, m in r["methods"].items():
            mk = m.get("mergekit", {})
            lines.append(
                f"{size:>9} {r['params'] / 1e9:6.2f}B {method:7} {m['safemerge']['wall_s']:11.2f} "
                f"{m['safemerge']['peak_rss_mb']:7.0f} {mk.get('wall_s', float('nan')):10.2f} "
                f"{mk.get('peak_rss_mb', float('nan')):7.0f} {m.get('wall_ratio', float('nan')):6.3f} "
                f"{m['io_floor']['total_s']:11.2f} {m['floor_ratio']:7.2f} {m['rss_per_largest_f32']:7.2f} "
                f"{m.get('max_abs_diff', float('nan')):8.2e}"
            )
    lines.append("ratio = safemerge / mergekit wall; ×floor = safemerge / I/O floor (read all inputs + write output "
                 "with fsync); RSS/f32 = safemerge peak RSS / largest input tensor in float32")
    return "\n".join(lines)


def run_scale(scale: str, work: Path, *, jobs: int, sizes: list[str] | None, mergekit: bool | None,
              keep: bool, results_dir: Path) -> dict[str, Any]:
    """The whole scale benchmark: returns the report and writes ``merge_speed_scale_<scale>.json``."""
    import platform

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    # 8B shapes: mergekit's bf16 TIES needs several GB per tensor; off unless asked for
    with_mk = (scale != "8b-layers") if mergekit is None else mergekit
    report: dict[str, Any] = {
        "scale": scale, "jobs": jobs, "dtype": "bfloat16", "mergekit": with_mk,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_start": os.getloadavg()},
        "sizes": {},
    }
    work.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"merge_speed_scale_{scale}.json"
    try:
        for size in sizes or SCALES[scale]:
            report["sizes"][size] = bench_size(size, work, jobs=jobs, mergekit=with_mk, env=env)
            report["machine"]["loadavg_at_end"] = os.getloadavg()
            out.write_text(json.dumps(report, indent=2) + "\n")  # after every size: a long run keeps what it measured
            if not keep:
                shutil.rmtree(work / size, ignore_errors=True)
    finally:
        if not keep:
            for size in sizes or SCALES[scale]:
                shutil.rmtree(work / size, ignore_errors=True)
    print()
    print(summary_table(report))
    print(f"load average at start {report['machine']['loadavg_at_start']}, at end "
          f"{report['machine']['loadavg_at_end']}")
    print(f"wrote {out}")
    return report
