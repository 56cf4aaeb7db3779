"""Memory bounded by one tensor, not the model (issue 16): streaming methods never hold a whole
input tensor in float32.

Structural, not timing-based: with the row-block size lowered so that a tiny model's embedding
spans many blocks, every read of an input tensor the executor streams is recorded. For the
methods that stream (element-wise ones and the TIES family), no read may exceed one row block,
and the magnitude methods must find their thresholds without the whole-tensor fallback. What
stays in memory per tensor is then the output (in its storage dtype), a few float32 blocks per
input, the threshold candidates — about 1/40 of a task vector per cut (a ±8σ sample bracket), as
measured here — and, for the L1 rescaling of DARE and DELLA, one float32 scratch buffer the size
of the tensor. The last test measures it: the peak RSS growth of a 3-model merge of 16 MiB
tensors, in a fresh process.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import safemerge.engine.run as engine_run  # noqa: E402
import safemerge.methods._tensor as tensor_helpers  # noqa: E402
from safemerge.api import merge  # noqa: E402
from safemerge.io.checkpoint import Checkpoint  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402

EMBED = "model.embed_tokens.weight"
BLOCK_BYTES = 4096  # 16 rows of the 512 × 64 embedding per block


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model

    root = tmp_path_factory.mktemp("bound")
    tok = build_tokenizer(512)
    out = {"base": save_model(make_tiny_model("llama", seed=0, vocab_size=512, hidden=64).to(torch.bfloat16),
                              root / "base", tokenizer=tok)}
    for i in (1, 2, 3):
        m = perturb_model(make_tiny_model("llama", seed=0, vocab_size=512, hidden=64), seed=i, scale=0.01)
        out[f"m{i}"] = save_model(m.to(torch.bfloat16), root / f"m{i}", tokenizer=tok)
    return out


def _config(method: str, p: dict[str, Path]) -> str:
    if method == "linear":
        return "merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
            f"  - model: {p[f'm{i}']}\n    parameters: {{weight: {w}}}\n" for i, w in ((1, 0.5), (2, 0.3), (3, 0.2)))
    dens = ", density: 0.5" if method != "task_arithmetic" else ""
    return f"merge_method: {method}\ndtype: bfloat16\nbase_model: {p['base']}\nmodels:\n" + "".join(
        f"  - model: {p[f'm{i}']}\n    parameters: {{weight: {w}{dens}}}\n" for i, w in ((1, 0.5), (2, 0.3), (3, 0.2)))


MAGNITUDE = ("ties", "breadcrumbs", "breadcrumbs_ties")
FAMILY = (*MAGNITUDE, "dare_ties", "dare_linear", "della", "della_linear")


@pytest.mark.parametrize("method", [*FAMILY, "linear", "task_arithmetic"])
def test_streamed_methods_read_one_block_at_a_time(models, method, tmp_path, monkeypatch) -> None:
    reads: list[int] = []  # elements of the embedding per read

    def recorder(fn, count):  # noqa: ANN001, ANN202
        def wrapped(self, name, *args, **kwargs):  # noqa: ANN001, ANN202
            if name == EMBED:
                reads.append(count(self, name, *args))
            return fn(self, name, *args, **kwargs)
        return wrapped

    cols = 64
    monkeypatch.setattr(Checkpoint, "copy_rows", recorder(Checkpoint.copy_rows, lambda s, n, a, b, *_: (b - a) * cols))
    monkeypatch.setattr(Checkpoint, "get_rows", recorder(Checkpoint.get_rows, lambda s, n, a, b, *_: (b - a) * cols))
    monkeypatch.setattr(Checkpoint, "get", recorder(Checkpoint.get, lambda s, n, *_: math.prod(s.shape(n))))
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", BLOCK_BYTES)

    candidates: list[int] = []
    scan = tensor_helpers.StreamedKth.result

    def result(self):  # noqa: ANN001, ANN202
        candidates.append(self.n_in)
        found = scan(self)
        assert found is not None, f"{method} fell back to a whole-tensor threshold selection"
        return found

    monkeypatch.setattr(tensor_helpers.StreamedKth, "result", result)
    merge(_config(method, models), tmp_path / "out", options=RunOptions(progress=False, threads=2))
    block_elems = BLOCK_BYTES // 4
    assert reads and max(reads) <= block_elems, f"a read of {max(reads)} elements, block is {block_elems}"
    n_inputs = 4 if method != "linear" else 3
    # magnitude methods: sample, threshold scan, merge; DARE/DELLA: the L1 norms (model and base, per
    # model: 2·3 reads) and the merge (4) — at most 3 reads of each input in both cases
    passes = 3 if method in FAMILY else 1
    assert sum(reads) <= passes * n_inputs * 512 * cols
    if method in MAGNITUDE:
        # the candidates kept to pin each threshold exactly: a small fraction of the tensor
        assert candidates and max(candidates) <= 512 * cols // 4, candidates


def test_streamed_output_equals_whole_tensor_output(models, tmp_path, monkeypatch) -> None:
    """The same merge without streaming (block larger than any tensor) gives the same bytes."""
    from safetensors.torch import load_file

    cfg = _config("ties", models)
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", 1 << 30)
    merge(cfg, tmp_path / "whole", options=RunOptions(progress=False))
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", BLOCK_BYTES)
    merge(cfg, tmp_path / "blocks", options=RunOptions(progress=False))
    x, y = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "blocks" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
import safemerge.engine.run as engine_run
from safemerge.api import merge
from safemerge.options import RunOptions

def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))

warm, big, out, *modes = sys.argv[1:]
options = RunOptions(progress=False, threads=1)
merge(Path(warm).read_text(), Path(out) / "warm", options=options)  # code and allocator warmed up
growth = {}
for mode in modes:
    engine_run.ELEMENTWISE_BLOCK_BYTES = 1 << 40 if mode == "whole" else 512 << 10
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    before = status("VmRSS")
    merge(Path(big).read_text(), Path(out) / mode, options=options)
    growth[mode] = status("VmHWM") - before
print(json.dumps(growth))
"""

BIG = (16384, 256)  # embed_tokens and lm_head: 16 MiB each in float32 (bfloat16 on disk)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, Path]:
    from safemerge.testing import make_tiny_model, perturb_model

    root = tmp_path_factory.mktemp("big")
    out = {}
    for i in range(4):
        model = make_tiny_model("llama", seed=0, vocab_size=BIG[0], hidden=BIG[1], layers=1)
        if i:
            perturb_model(model, seed=i, scale=0.01)
        out["base" if i == 0 else f"m{i}"] = root / f"model{i}"
        model.to(torch.bfloat16).save_pretrained(out["base" if i == 0 else f"m{i}"])
    return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_peak_memory_is_a_small_multiple_of_one_tensor(models, big_models, tmp_path, method) -> None:
    """The peak RSS growth of a 3-model DARE-TIES / DELLA merge (``-j 1``, L1 rescaling on) stays below
    2× one input tensor in float32: the scratch buffer (1×), the bit-packed masks (3/32×), a few
    blocks and what the allocator keeps of their temporaries — no output tensor, whose row blocks
    go straight into the shard (measured 1.4–1.5× for both; 1.4× before, with the bf16 output held
    and no masks kept), where the whole-tensor path needs about N + 3 of them (measured 7–8×)."""
    import json
    import subprocess
    import sys

    tensor_bytes = 4 * BIG[0] * BIG[1]
    (tmp_path / "warm.yml").write_text(_config(method, models))
    (tmp_path / "big.yml").write_text(_config(method, big_models))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, tmp_path / "warm.yml", tmp_path / "big.yml",
                          tmp_path / "out", "streamed", "whole"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    print(method, {mode: round(g / tensor_bytes, 2) for mode, g in growth.items()})
    assert growth["streamed"] <= 2 * tensor_bytes, growth
    assert growth["whole"] >= 3 * tensor_bytes, growth  # a bound the whole-tensor path does not meet
