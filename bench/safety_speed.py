"""Benchmark: safety scan + SafeMERGE with the low-rank similarity vs the dense-projection method.

The dense method is what the SafeLoRA / SafeMERGE reference code does: materialise
``C = V Vᵀ/‖V‖_F`` (out × out) per layer, densify ``ΔW = s·B A`` and take
``cos(C ΔW, ΔW)``. safemerge computes the same ρ from r × r traces (``safemerge.methods.similarity``).

(a) SmolLM2-135M shapes (random-init LlamaConfig: hidden 576, 30 layers, intermediate 1536,
    9 heads, 3 kv heads, vocab 49152; bf16 safetensors on disk) with a q,v LoRA (r = 8) and an
    all-linear LoRA (r = 16): ``safemerge scan`` / ``safemerge_adapters`` end to end vs the dense
    method over the same layers, plus the time to merely read the two checkpoints' target weights.
(b) Llama-3.1-8B layer shapes (q 4096², v 1024×4096, gate/up 14336×4096, down 4096×14336),
    r = 16, fp32, 1 torch thread by default: per-module time and peak extra memory (RSS, each measurement in a fresh
    subprocess) of both methods. The dense method runs on ONE layer per module shape; the 32-layer
    totals are extrapolated (× 32) and labelled as such.

Run:  .venv/bin/python bench/safety_speed.py            (≈ 10 min on a busy 2-core machine)
      .venv/bin/python bench/safety_speed.py --quick    (smaller (b), fewer SmolLM2 layers)
Writes bench/results/safety_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

LLAMA8B = {  # name: (out, in)
    "q_proj": (4096, 4096),
    "v_proj": (1024, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- (b) one module, in a child
def child_module(method: str, out_dim: int, in_dim: int, r: int, threads: int) -> dict:
    """Time and peak extra RSS of one ρ computation (run in a fresh process)."""
    import torch

    from safemerge.methods.similarity import rho_lowrank

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(out_dim + in_dim)
    V = torch.randn(out_dim, in_dim, generator=g)
    A = torch.randn(r, in_dim, generator=g) * 0.01
    B = torch.randn(out_dim, r, generator=g) * 0.01
    s = 2.0
    v_norm = float(torch.linalg.vector_norm(V))
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    if method == "lowrank":
        rho = rho_lowrank(V, A, B * s, v_norm=v_norm)
    else:  # reference: C materialised, ΔW densified
        C = (V @ V.T) / v_norm
        dW = (B * s) @ A
        proj = C @ dW
        rho = float(torch.nn.functional.cosine_similarity(proj.reshape(1, -1), dW.reshape(1, -1)).item())
    dt = time.perf_counter() - t0
    extra = max(_maxrss_mb() - rss0, 0.0)
    res = {"rho": rho, "seconds": dt, "extra_mb": extra}
    if method == "lowrank":  # exact reference value: the same traces in float64
        res["rho_fp64"] = rho_lowrank(V.double(), A.double(), (B * s).double())
    if method == "dense64":  # C materialised in float64 (slow; used on small shapes only)
        Vd, dWd = V.double(), ((B * s) @ A).double()
        C = Vd @ Vd.T / torch.linalg.vector_norm(Vd)
        pr = C @ dWd
        res["rho"] = float((pr * dWd).sum() / (torch.linalg.vector_norm(pr) * torch.linalg.vector_norm(dWd)))
    return res


def run_child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": args[-1]}
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_8b(r: int, threads: int, lowrank_layers: int) -> dict:
    """Per-module (b): low-rank on ``lowrank_layers`` fresh layers (mean), dense on one layer."""
    rows = {}
    for name, (o, i) in LLAMA8B.items():
        lows = [run_child("lowrank", str(o), str(i), str(r), str(threads)) for _ in range(lowrank_layers)]
        if name == "up_proj":  # same shape as gate_proj: reuse its dense measurement (labelled)
            dense = dict(rows["gate_proj"]["dense"])
            dense["note"] = "same shape as gate_proj; dense figure reused"
        else:
            dense = run_child("dense", str(o), str(i), str(r), str(threads))
        low = {"seconds": sum(x["seconds"] for x in lows) / len(lows), "extra_mb": max(x["extra_mb"] for x in lows),
               "rho": lows[0]["rho"], "rho_fp64": lows[0]["rho_fp64"]}
        rows[name] = {
            "shape": [o, i],
            "lowrank": low,
            "dense": dense,
            "rho_abs_diff": abs(low["rho"] - dense["rho"]),
            "rho_lowrank_fp32_vs_fp64": abs(low["rho"] - low["rho_fp64"]),
            "rho_dense_fp32_vs_fp64": abs(dense["rho"] - low["rho_fp64"]),
            "c_matrix_mb": o * o * 4 / 1e6,
            "speedup": dense["seconds"] / max(low["seconds"], 1e-9),
        }
        print(f"  {name:9s} {o:>5}×{i:<5}  low-rank {low['seconds']*1e3:8.1f} ms {low['extra_mb']:7.1f} MB | "
              f"dense(C) {dense['seconds']:7.2f} s {dense['extra_mb']:8.1f} MB | ×{rows[name]['speedup']:.0f} faster | "
              f"|ρ_lr − ρ_exact| {rows[name]['rho_lowrank_fp32_vs_fp64']:.1e}, |ρ_denseC − ρ_exact| "
              f"{rows[name]['rho_dense_fp32_vs_fp64']:.1e}", flush=True)
    o, i = LLAMA8B["v_proj"]
    d64 = run_child("dense64", str(o), str(i), str(r), str(threads))
    rows["v_proj"]["rho_dense_fp64"] = d64["rho"]
    rows["v_proj"]["rho_lowrank_fp32_vs_dense_fp64"] = abs(rows["v_proj"]["lowrank"]["rho"] - d64["rho"])
    rows["v_proj"]["rho_lowrank_fp64_vs_dense_fp64"] = abs(rows["v_proj"]["lowrank"]["rho_fp64"] - d64["rho"])
    print(f"  v_proj cross-check with C materialised in float64: |ρ_lowrank(fp32) − ρ_dense(fp64)| = "
          f"{rows['v_proj']['rho_lowrank_fp32_vs_dense_fp64']:.1e}, fp64 vs fp64 "
          f"{rows['v_proj']['rho_lowrank_fp64_vs_dense_fp64']:.1e}", flush=True)
    per_layer_low = sum(v["lowrank"]["seconds"] for v in rows.values())
    per_layer_dense = sum(v["dense"]["seconds"] for v in rows.values())
    low_mem = max(v["lowrank"]["extra_mb"] for v in rows.values())
    dense_mem = max(v["dense"]["extra_mb"] for v in rows.values())
    return {
        "rank": r,
        "threads": threads,
        "modules": rows,
        "per_layer_seconds": {"lowrank": per_layer_low, "dense": per_layer_dense},
        "extrapolated_32_layers_seconds": {"lowrank": 32 * per_layer_low, "dense": 32 * per_layer_dense,
                                           "note": "measured on one layer per module shape, multiplied by 32"},
        "peak_extra_mb": {"lowrank": low_mem, "dense": dense_mem},
        "speedup": per_layer_dense / max(per_layer_low, 1e-9),
        "memory_ratio": dense_mem / max(low_mem, 1.0),
        "memory_ratio_note": "low-rank extra RSS floored at 1 MB for the ratio",
        "max_rho_abs_diff": max(v["rho_abs_diff"] for v in rows.values()),
        "max_rho_lowrank_fp32_vs_exact": max(v["rho_lowrank_fp32_vs_fp64"] for v in rows.values()),
        "max_rho_dense_fp32_vs_exact": max(v["rho_dense_fp32_vs_fp64"] for v in rows.values()),
        "exact_note": "exact = the low-rank traces in float64; cross-checked against C materialised in float64 on "
                      "v_proj",
        "reference_keeps_all_C_gb_q_v": 32 * (4096**2 + 1024**2) * 4 / 1e9,
        "reference_keeps_all_C_gb_all_linear": 32 * (4096**2 * 2 + 1024**2 * 2 + 14336**2 * 2 + 4096**2 * 0) * 4 / 1e9,
    }


# ----------------------------------------------------------------------------- (a) SmolLM2-135M shapes
def make_smollm(root: Path, layers: int) -> dict:
    """bf16 base/aligned checkpoints with SmolLM2-135M shapes + two PEFT-format adapters."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from safemerge.io.adapter import save_adapter

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (576, 576), p + "self_attn.k_proj.weight": (192, 576),
            p + "self_attn.v_proj.weight": (192, 576), p + "self_attn.o_proj.weight": (576, 576),
            p + "mlp.gate_proj.weight": (1536, 576), p + "mlp.up_proj.weight": (1536, 576),
            p + "mlp.down_proj.weight": (576, 1536),
            p + "input_layernorm.weight": (576,), p + "post_attention_layernorm.weight": (576,),
        })
    base, aligned = {}, {}
    for n, s in shapes.items():
        w = torch.randn(s, generator=g) * 0.02
        base[n] = w.to(torch.bfloat16)
        aligned[n] = (w + torch.randn(s, generator=g) * 0.002).to(torch.bfloat16)
    paths = {}
    for name, sd in (("base", base), ("aligned", aligned)):
        d = root / name
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
        paths[name] = d
    for name, targets, r in (("qv", ("q_proj", "v_proj"), 8), ("all", ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"), 16)):
        for role in ("ft", "safety"):
            mods = {}
            for n, s in shapes.items():
                m = n[: -len(".weight")]
                if len(s) == 2 and m.rsplit(".", 1)[-1] in targets:
                    mods[m] = (torch.randn(r, s[1], generator=g) * 0.05, torch.randn(s[0], r, generator=g) * 0.05)
            d = root / f"{name}_{role}"
            save_adapter(d, mods, base_model_name_or_path=str(paths["aligned"]))
            paths[f"{name}_{role}"] = d
    return paths


def dense_reference_scan(base: Path, aligned: Path, adapter: Path, dtype: str = "float32") -> tuple[dict, float]:
    """The reference procedure: per target, C = VVᵀ/‖V‖_F materialised, ΔW densified, cosine (in ``dtype``)."""
    import torch

    from safemerge.io.adapter import load_adapter
    from safemerge.io.checkpoint import Checkpoint

    b, a, ad = Checkpoint(base), Checkpoint(aligned), load_adapter(adapter)
    t0 = time.perf_counter()
    out = {}
    for m in ad:
        w = f"{m}.weight"
        V = (a.get(w) - b.get(w)).to(getattr(torch, dtype))
        vn = torch.linalg.vector_norm(V)
        C = V @ V.T / vn
        dW = ad[m].delta().to(V.dtype)
        out[m] = float(torch.nn.functional.cosine_similarity((C @ dW).reshape(1, -1), dW.reshape(1, -1)).item())
    return out, time.perf_counter() - t0


def bench_smollm(layers: int, threads: int) -> dict:
    """(a): end-to-end scan / SafeMERGE on SmolLM2-135M shapes vs the dense reference scan."""
    import torch

    from safemerge.io.checkpoint import Checkpoint
    from safemerge.safety.api import safemerge_adapters, scan
    from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings

    torch.set_num_threads(threads)
    res: dict = {"layers": layers, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="safety_bench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = make_smollm(root, layers)
        res["build_seconds"] = time.perf_counter() - t0
        for name in ("qv", "all"):
            ft = paths[f"{name}_ft"]
            # lower bound: read both checkpoints' target weights (what any scan must do)
            from safemerge.io.adapter import load_adapter

            mods = list(load_adapter(ft))
            b, a = Checkpoint(paths["base"]), Checkpoint(paths["aligned"])
            t0 = time.perf_counter()
            for m in mods:
                _ = a.get(f"{m}.weight") - b.get(f"{m}.weight")
            t_read = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = scan(paths["base"], paths["aligned"], ft)
            t_scan = time.perf_counter() - t0
            ref, t_dense = dense_reference_scan(paths["base"], paths["aligned"], ft)
            exact, _ = dense_reference_scan(paths["base"], paths["aligned"], ft, dtype="float64")
            diff = max(abs(s.rho - exact[s.module]) for s in scores)
            diff_ref = max(abs(ref[m] - exact[m]) for m in exact)
            tau = sorted(s.rho for s in scores)[len(scores) // 2]  # merge half the layers
            t0 = time.perf_counter()
            safemerge_adapters(SafeMergeModels(paths["base"], paths["aligned"], ft, paths[f"{name}_safety"]),
                               root / f"out_{name}", settings=SafeMergeSettings(tau=tau))
            t_merge = time.perf_counter() - t0
            res[name] = {
                "modules": len(mods),
                "read_two_checkpoints_seconds": t_read,
                "scan_seconds": t_scan,
                "scan_over_read": t_scan / max(t_read, 1e-9),
                "dense_reference_scan_seconds": t_dense,
                "speedup_scan": t_dense / max(t_scan, 1e-9),
                "safemerge_end_to_end_seconds": t_merge,
                "max_rho_abs_diff_vs_dense_fp64": diff,
                "max_rho_abs_diff_dense_fp32_vs_dense_fp64": diff_ref,
            }
            print(f"  {name:3s} LoRA: {len(mods)} modules | read base+aligned {t_read:.2f} s | scan {t_scan:.2f} s "
                  f"(×{t_scan / max(t_read, 1e-9):.2f} of read) | dense-C {t_dense:.2f} s "
                  f"(×{t_dense / max(t_scan, 1e-9):.1f}) | "
                  f"SafeMERGE end-to-end {t_merge:.2f} s | max |ρ − ρ_denseC,fp64| {diff:.1e} (dense-C fp32: "
                  f"{diff_ref:.1e})", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=5, metavar=("METHOD", "OUT", "IN", "R", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smaller run (8 SmolLM2 layers, 8B: q/v/down only)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both methods (1 is steadiest on a shared machine)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "safety_speed.json")
    args = ap.parse_args()
    if args.child:
        method, o, i, r, th = args.child
        print(json.dumps(child_module(method, int(o), int(i), int(r), int(th))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"command": "python bench/safety_speed.py" + (" --quick" if args.quick else ""),
                    "threads": args.threads}
    if args.quick:
        for k in ("gate_proj", "up_proj"):
            LLAMA8B.pop(k)
    print(f"(b) Llama-3.1-8B layer shapes, r = {args.rank}, fp32, {args.threads} threads "
          "(low-rank: mean of 2 layers; dense C: 1 layer, ×32 extrapolated)", flush=True)
    result["llama8b"] = bench_8b(args.rank, args.threads, lowrank_layers=2)
    b = result["llama8b"]
    print(f"  per layer: low-rank {b['per_layer_seconds']['lowrank']:.3f} s vs dense "
          f"{b['per_layer_seconds']['dense']:.2f} s "
          f"→ ×{b['speedup']:.0f}; 32 layers (extrapolated): {b['extrapolated_32_layers_seconds']['lowrank']:.1f} s vs "
          f"{b['extrapolated_32_layers_seconds']['dense']:.0f} s; peak extra memory "
          f"{b['peak_extra_mb']['lowrank']:.1f} MB vs "
          f"{b['peak_extra_mb']['dense']:.0f} MB (×{b['memory_ratio']:.0f}); max |ρ_lowrank − ρ_exact| "
          f"{b['max_rho_lowrank_fp32_vs_exact']:.1e} "
          f"(dense-C fp32: {b['max_rho_dense_fp32_vs_exact']:.1e})", flush=True)
    layers = 8 if args.quick else 30
    print(f"(a) SmolLM2-135M shapes ({layers} layers, bf16 on disk)", flush=True)
    result["smollm2"] = bench_smollm(layers, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
