"""Row-block streaming for element-wise methods gives exactly the whole-tensor result."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

import safemerge.engine.run as engine_run  # noqa: E402
from safemerge.api import merge  # noqa: E402
from safemerge.io.references import open_checkpoint  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import make_tiny_model, perturb_model, save_model  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("stream")
    a = save_model(make_tiny_model("llama", seed=0), root / "a")
    b = save_model(perturb_model(make_tiny_model("llama", seed=0), seed=1), root / "b")
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                          init_lora_weights=False)
    peft = get_peft_model(make_tiny_model("llama", seed=0), lora_cfg)
    peft.save_pretrained(root / "lora")
    return {"a": a, "b": b, "lora": root / "lora"}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "nearswap"])
def test_row_blocks_equal_whole_tensors(inputs, tmp_path, monkeypatch, method) -> None:
    a, b, lora = inputs["a"], inputs["b"], inputs["lora"]
    if method == "linear":
        cfg = (f"merge_method: linear\nmodels:\n  - model: {a}+{lora}\n    parameters: {{weight: 0.3}}\n"
               f"  - model: {b}\n    parameters: {{weight: [0.5, 0.9]}}\n")
    elif method == "task_arithmetic":
        cfg = (f"merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n"
               f"  - model: {b}\n    parameters: {{weight: 0.7}}\n"
               f"  - model: {a}+{lora}\n    parameters: {{weight: 0.4}}\n")
    else:
        cfg = f"merge_method: nearswap\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters: {{t: 0.01}}\n"
    merge(cfg, tmp_path / "whole", options=RunOptions(progress=False))
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", 700)
    merge(cfg, tmp_path / "blocks", options=RunOptions(progress=False))
    x, y = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "blocks" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_get_rows_matches_slices(inputs) -> None:
    ck = open_checkpoint(f"{inputs['a']}+{inputs['lora']}")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        full = ck.get(name)
        torch.testing.assert_close(ck.get_rows(name, 3, 11), full[3:11], atol=1e-6, rtol=0)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_two_pass_ties_equals_whole_tensor(inputs, tmp_path, monkeypatch, density) -> None:
    """TIES on large tensors (thresholds first, election in row blocks) is bit-identical."""
    import torch

    from safemerge.testing import perturb_model, save_model

    a, b = inputs["a"], inputs["b"]
    c = save_model(perturb_model(__import__("safemerge.testing", fromlist=["x"]).make_tiny_model("llama", seed=0),
                                 seed=5), tmp_path / "c")
    # quantise one model so that exact ties straddle the top-k cut-off
    from safetensors.torch import load_file, save_file

    sd = load_file(c / "model.safetensors")
    sd = {k: (v * 64).round() / 64 for k, v in sd.items()}
    save_file(sd, str(c / "model.safetensors"), metadata={"format": "pt"})
    cfg = (
        f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.7, density: "
        f"{density}}}\n"
        f"  - model: {c}\n    parameters: {{weight: [0.2, 0.6], density: 0.5}}\n  - model: {a}+{inputs['lora']}\n    "
        f"parameters: {{weight: 0.4, density: 0.25}}\n"
    )
    merge(cfg, tmp_path / "whole", options=RunOptions(progress=False))
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", 900)
    merge(cfg, tmp_path / "blocks", options=RunOptions(progress=False))
    x, y = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "blocks" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_bf16_rows_go_to_the_fused_kernel_unwidened(inputs, tmp_path, monkeypatch, method) -> None:
    """Models stored in bfloat16: the TIES-family kernel reads their rows as stored (``TwoPassJob.load_bf16``,
    widened inside the fused loop) and writes the whole-tensor merge's bits; tied magnitudes straddle the cuts."""
    from safetensors.torch import save_file

    models = {}
    for key, scale in (("a", None), ("b", 64), ("c", 32)):
        sd = load_file(inputs["a" if key == "c" else key] / "model.safetensors")
        if key == "c":
            sd = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) * 0.05 for k, v in sd.items()}
        sd = {k: ((v * scale).round() / scale if scale else v).to(torch.bfloat16) for k, v in sd.items()}
        (tmp_path / key).mkdir()
        save_file(sd, str(tmp_path / key / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / key / "config.json").write_text((inputs["a"] / "config.json").read_text())
        models[key] = tmp_path / key
    cfg = (f"merge_method: {method}\nbase_model: {models['a']}\nmodels:\n"
           f"  - model: {models['b']}\n    parameters: {{weight: 0.7, density: 0.4}}\n"
           f"  - model: {models['c']}\n    parameters: {{weight: 0.3, density: 0.6}}\ndtype: bfloat16\n")
    merge(cfg, tmp_path / "whole", options=RunOptions(progress=False))
    stored_reads = []
    original = engine_run._load_rows

    def spied(*args):  # noqa: ANN002, ANN202
        rows = original(*args)
        if rows.dtype == torch.bfloat16:
            stored_reads.append(args[1])
        return rows

    monkeypatch.setattr(engine_run, "_load_rows", spied)
    monkeypatch.setattr(engine_run, "ELEMENTWISE_BLOCK_BYTES", 900)
    merge(cfg, tmp_path / "blocks", options=RunOptions(progress=False))
    assert stored_reads  # (the bfloat16 path was taken)
    x, y = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "blocks" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("transpose", [False, True])
def test_lora_rows_are_bit_stable_across_block_heights(transpose) -> None:
    """Any row range of ΔW equals the same rows of the whole ΔW bit for bit (fixed, aligned blocks)."""
    from safemerge.io.adapter import LORA_ROW_BLOCK, LoraModule

    g = torch.Generator().manual_seed(0)
    rows, cols, r = 3 * LORA_ROW_BLOCK + 17, 96, 8
    A, B = torch.randn(r, cols if not transpose else rows, generator=g), torch.randn(rows if not transpose else cols, r,
                                                                                     generator=g)
    mod = LoraModule("m", A, B, scaling=0.37, transpose=transpose)
    whole = mod.delta()
    assert whole.shape == (rows, cols)
    torch.testing.assert_close(whole, ((B @ A) * 0.37).T if transpose else (B @ A) * 0.37, rtol=1e-6, atol=1e-6)
    for start, stop in [(0, 1), (5, 70), (63, 65), (64, 128), (100, rows), (rows - 1, rows), (0, rows)]:
        assert torch.equal(mod.delta_rows(start, stop), whole[start:stop])


def test_shard_writer_stores_row_blocks_in_place(tmp_path) -> None:
    """``add_rows`` writes each block at its rows' offset; a tensor counts as written only once all
    its rows are, and a block of the wrong shape is refused."""
    from safemerge.io.output import ShardWriter

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = torch.arange(40, dtype=torch.float32).reshape(10, 4).to(torch.bfloat16)
    writer = ShardWriter(tmp_path / "a", plan=[("w", (10, 4)), ("v", (3,))],
                         plan_dtypes={"w": "bfloat16", "v": "float32"})
    for rows in ((6, 10), (0, 3), (3, 6)):  # any order
        writer.add_rows("w", rows, full[rows[0] : rows[1]])
    with pytest.raises(RuntimeError, match="planned"):
        writer.add_rows("w", (0, 2), full[0:3])
    writer.add("v", torch.ones(3))
    writer.finish()
    assert torch.equal(load_file(tmp_path / "a" / "model.safetensors")["w"], full)
    partial = ShardWriter(tmp_path / "b", plan=[("w", (10, 4))], plan_dtypes={"w": "bfloat16"})
    partial.add_rows("w", (0, 5), full[0:5])
    with pytest.raises(RuntimeError, match="never written"):
        partial.finish()


def test_a_merge_of_local_models_imports_neither_transformers_nor_the_hub_client(inputs, tmp_path) -> None:
    """transformers (0.4-0.7 s to import) and huggingface_hub's client (~0.1 s) are loaded only by a
    merge that aligns vocabularies or resolves a Hub id: a plain merge of local models — what the
    135M benchmark times end to end — must not pay for them."""
    import subprocess
    import sys

    cfg = tmp_path / "linear.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {inputs['a']}\n    parameters: {{weight: 0.4}}\n"
                   f"  - model: {inputs['b']}\n    parameters: {{weight: 0.6}}\ndtype: float32\n")
    code = ("import sys; import safemerge.api as api; from safemerge.options import RunOptions; "
            f"api.merge({str(cfg)!r}, {str(tmp_path / 'out')!r}, options=RunOptions(progress=False)); "
            "print('transformers' in sys.modules, 'huggingface_hub.hf_api' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False"], r.stdout + r.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
