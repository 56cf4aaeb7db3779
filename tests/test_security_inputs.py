"""Issue 11 guarantees that need more than the bad-input corpus: a static check that every model,
tokenizer and config load passes ``trust_remote_code`` explicitly, ``--force`` onto a symlink,
PEFT's ``fan_in_fan_out`` rule, and the bounded YAML loader."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from safemerge.options import RunOptions

QUIET = RunOptions(progress=False)

SRC = Path(__file__).resolve().parents[1] / "src" / "safemerge"

# Calls that can import code from a model directory or the hub.
_LOADERS = {"from_pretrained", "from_config", "pipeline", "LLM"}
# PEFT loads adapter weights and config only (no auto_map); its base model was loaded (and checked) first.
_NO_CODE_LOADERS = {"PeftModel.from_pretrained"}


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else f.value.attr if isinstance(f.value,
                                                                                            ast.Attribute) else ""
        return f"{owner}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def _loader_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and _call_name(node).split(".")[-1] in _LOADERS:
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", node))
    return calls


def _passes_flag(node: ast.Call) -> bool:
    if any(k.arg == "trust_remote_code" for k in node.keywords):
        return True
    # LLM(**kwargs) where kwargs = dict(..., trust_remote_code=...) is built just before
    return any(k.arg is None for k in node.keywords) and _call_name(node) == "LLM"


def test_every_model_tokenizer_and_config_load_passes_trust_remote_code_explicitly() -> None:
    calls = _loader_calls()
    assert len(calls) >= 8  # the check sees the loaders (judges, generation, training, GGUF, optimize, demo, testing)
    missing = [where for where, node in calls if _call_name(node) not in _NO_CODE_LOADERS and not _passes_flag(node)]
    assert not missing, f"loads without an explicit trust_remote_code: {missing}"


def test_static_check_catches_a_load_without_the_flag() -> None:
    node = ast.parse("AutoTokenizer.from_pretrained(path)").body[0].value
    assert _call_name(node).endswith("from_pretrained") and not _passes_flag(node)
    node = ast.parse("AutoTokenizer.from_pretrained(path, trust_remote_code=False)").body[0].value
    assert _passes_flag(node)


def _tiny(tmp_path: Path, name: str, seed: int) -> Path:
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    m = make_tiny_model("llama", seed=0)
    if seed:
        perturb_model(m, seed=seed)
    return save_model(m, tmp_path / name)


def test_custom_code_refused_by_the_python_api_too(tmp_path: Path) -> None:
    from safemerge.errors import CheckpointError
    from safemerge.io.checkpoint import refuse_custom_code
    from safemerge.train.lora import train_lora
    from safemerge.train.recipe import TrainingRecipe

    d = _tiny(tmp_path, "m", 0)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling.Model"}
    (d / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(CheckpointError, match="custom Python code"):
        train_lora(d, tmp_path / "data.jsonl", tmp_path / "out", recipe=TrainingRecipe(steps=1), options=QUIET)
    refuse_custom_code(d, trust_remote_code=True)  # the user's explicit choice is honoured
    assert not (tmp_path / "out").exists()


def test_force_onto_a_symlink_replaces_the_link_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import yaml

    from safemerge.cli import main

    a, b = _tiny(tmp_path, "a", 1), _tiny(tmp_path, "b", 2)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not an input, and still not deleted")
    out = tmp_path / "out"
    out.symlink_to(target)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    main(["merge", str(cfg), str(out), "--force", "--no-progress"])  # returns: exit status 0
    assert out.is_dir() and not out.is_symlink() and (out / "model.safetensors").is_file()
    assert (target / "keep.txt").read_text() == "not an input, and still not deleted"
    assert not [p.name for p in tmp_path.iterdir() if ".safemerge-" in p.name]


def test_dangling_symlink_out_is_replaced_with_force(tmp_path: Path) -> None:
    from safemerge.io.output import atomic_output

    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with atomic_output(out, force=True) as tmp:
        (tmp / "x.txt").write_text("x")
    assert (out / "x.txt").read_text() == "x" and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fan_in_fan_out_on_a_square_linear_follows_peft(tmp_path: Path) -> None:
    """PEFT ignores fan_in_fan_out on nn.Linear (q_proj is square here): so must model+adapter."""
    torch = pytest.importorskip("torch")
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from safemerge.io.references import open_checkpoint

    base = _tiny(tmp_path, "base", 0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=False)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], fan_in_fan_out=True,
                                              init_lora_weights=False))
        pm.save_pretrained(tmp_path / "ad")
        merged = pm.merge_and_unload().state_dict()
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True  # PEFT reset the flag on nn.Linear when saving; a hand-edited config keeps it
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    ck = open_checkpoint(f"{base}+{tmp_path / 'ad'}")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert ck.shape(name)[0] == ck.shape(name)[1]
    torch.testing.assert_close(ck.get(name), merged[name].float(), rtol=1e-5, atol=1e-6)


def test_yaml_loader_bounds_depth_and_alias_expansion() -> None:
    from safemerge.config.yaml_io import MAX_DEPTH, load_yaml
    from safemerge.errors import ConfigError

    assert load_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases still work
    assert load_yaml("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml("[" * 5000 + "]" * 5000)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 10)}]\n" for c in "bcdefghi")
    with pytest.raises(ConfigError, match="alias"):
        load_yaml(bomb)
    with pytest.raises(ConfigError, match="itself"):
        load_yaml("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="invalid YAML at line 2"):
        load_yaml("a: [1, 2\n")


def test_shard_index_paths_cannot_escape_and_pipes_are_never_opened(tmp_path: Path) -> None:
    from safemerge.errors import CheckpointError
    from safemerge.io.checkpoint import Checkpoint, require_regular_file

    d = tmp_path / "m"
    d.mkdir()
    for shard in ("/etc/passwd", "../x.safetensors", "a/../../x.safetensors"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError, match="outside the model directory"):
            Checkpoint(d)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match="named pipe"):
        require_regular_file(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match="device"):
        require_regular_file(Path("/dev/zero"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2"])
def test_checkpoint_refuses_nonfinite_on_read_in_every_float_dtype(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from safemerge.errors import CheckpointError
    from safemerge.io.checkpoint import Checkpoint

    dt = getattr(torch, dtype)
    good = torch.ones(4, 3).to(dt)
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    save_file({"good": good, "bad": bad.to(dt)}, str(tmp_path / "w.safetensors"))
    ck = Checkpoint(tmp_path / "w.safetensors")
    assert ck.get("good").tolist() == torch.ones(4, 3).tolist()
    with pytest.raises(CheckpointError, match="'bad' .* contains NaN"):
        ck.get("bad")
    with pytest.raises(CheckpointError, match="NaN"):
        ck.get_rows("bad", 1, 3)
    assert ck.get_rows("bad", 0, 2).shape == (2, 3)  # rows without the NaN are fine
    assert Checkpoint(tmp_path / "w.safetensors",
                      options=RunOptions(allow_nonfinite=True)).get("bad").isnan().sum() == 1
