"""The bad-input corpus (tests/bad_inputs/): every command answers malformed input with a short,
actionable error, exit status 2, no traceback, and no output (or temporary) left behind."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model  # noqa: E402

CORPUS = Path(__file__).parent / "bad_inputs"


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # lower-case phrase the error must contain
    out: str | None = "{out}"  # the output path that must not be created
    files: dict[str, str] = field(default_factory=dict)


def _fill(text: str, paths: dict[str, str]) -> str:
    for k, v in paths.items():
        text = text.replace("{" + k + "}", v)
    return text.replace("{{", "{").replace("}}", "}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_world")
    p: dict[str, str] = {}
    base = make_tiny_model("llama", seed=0)
    p["base"] = str(save_model(base, root / "base"))
    for i in (1, 2):
        m = make_tiny_model("llama", seed=0)
        perturb_model(m, seed=i)
        p[f"m{i}"] = str(save_model(m, root / f"m{i}"))
    p["qwen"] = str(save_model(make_tiny_model("qwen2", seed=0), root / "qwen"))
    p["wide"] = str(save_model(make_tiny_model("llama", seed=0, hidden=48), root / "wide"))
    p["vocab"] = str(save_model(make_tiny_model("llama", seed=0, vocab_size=136), root / "vocab", tokenizer=build_tokenizer(136)))
    # truncated and corrupted safetensors
    for name, mutate in (("truncated", lambda b: b[: len(b) // 2]), ("corrupt", lambda b: b[:8] + b"\x00garbage" + b[16:])):
        d = root / name
        shutil.copytree(p["m1"], d)
        f = d / "model.safetensors"
        f.write_bytes(mutate(f.read_bytes()))
        p[name] = str(d)
    # a pickle checkpoint
    d = root / "pickle"
    d.mkdir()
    shutil.copy(Path(p["m1"]) / "config.json", d / "config.json")
    torch.save(make_tiny_model("llama", seed=0).state_dict(), d / "pytorch_model.bin")
    p["pickle"] = str(d)
    # NaN weights
    from safetensors.torch import load_file, save_file

    d = root / "nan"
    shutil.copytree(p["m1"], d)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("inf")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    p["nan"] = str(d)
    # not a model, missing paths, a file where a directory is needed
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    p["not_a_model"] = str(root / "not_a_model")
    p["missing"] = str(root / "does_not_exist")
    (root / "a_file").write_text("x")
    p["a_file"] = str(root / "a_file")
    # PEFT adapters: a good one, one targeting a module the base lacks, a corrupt one
    from peft import LoraConfig, get_peft_model

    for name, targets in (("adapter", ["q_proj", "v_proj"]), ("adapter_r", ["q_proj", "v_proj"])):
        m = get_peft_model(make_tiny_model("llama", seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        m.save_pretrained(root / name)
        p[name] = str(root / name)
    d = root / "bad_adapter"
    shutil.copytree(p["adapter"], d)
    sd = load_file(d / "adapter_model.safetensors")
    sd = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in sd.items()}
    save_file(sd, str(d / "adapter_model.safetensors"))
    p["bad_adapter"] = str(d)
    d = root / "corrupt_adapter"
    shutil.copytree(p["adapter"], d)
    (d / "adapter_config.json").write_text("{not json")
    p["corrupt_adapter"] = str(d)
    # datasets
    (root / "empty.jsonl").write_text("")
    (root / "malformed.json").write_text('[{"prompt": "hi", ')
    (root / "no_columns.jsonl").write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) + "\n" for i in range(4)))
    for k in ("empty.jsonl", "malformed.json", "no_columns.jsonl", "good.jsonl"):
        p[k.split(".")[0]] = str(root / k)
    # not a GGUF, truncated GGUF
    (root / "fake.gguf").write_bytes(b"NOTGGUF" + bytes(100))
    p["fake_gguf"] = str(root / "fake.gguf")
    (root / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(10))
    p["short_gguf"] = str(root / "short.gguf")
    # optimize configs
    (root / "opt_bad_method.yml").write_text(
        f"genome:\n  models: [{p['m1']}, {p['m2']}]\n  merge_method: della\n  base_model: {p['base']}\n"
        f"data:\n  safety: {p['good']}\n"
    )
    p["opt_bad_method"] = str(root / "opt_bad_method.yml")
    (root / "opt_empty.yml").write_text("")
    p["opt_empty"] = str(root / "opt_empty.yml")
    # an existing output directory (must be left untouched)
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious")
    p["existing"] = str(root / "existing")
    return p


YAML_CASES = [
    ("merge-invalid-yaml", "invalid_yaml.yml", "invalid yaml"),
    ("merge-unknown-method", "unknown_method.yml", "unknown merge_method"),
    ("merge-unknown-parameter", "unknown_parameter.yml", "unknown parameter"),
    ("merge-unknown-key", "unknown_key.yml", "unknown key"),
    ("merge-missing-required-weight", "missing_weight.yml", "missing required parameter"),
    ("merge-density-above-one", "density_out_of_range.yml", "outside"),
    ("merge-density-zero", "density_zero.yml", "outside"),
    ("merge-t-out-of-range", "slerp_t_out_of_range.yml", "outside"),
    ("merge-missing-base", "missing_base.yml", "base_model"),
    ("merge-missing-model-path", "missing_model_path.yml", "does not exist"),
    ("merge-directory-not-a-model", "not_a_model.yml", "not a model directory"),
    ("merge-architecture-mismatch", "arch_mismatch.yml", "architectures differ"),
    ("merge-shape-mismatch", "shape_mismatch.yml", "mismatch"),
    ("merge-vocabulary-mismatch", "vocab_mismatch.yml", "vocabularies differ"),
    ("merge-truncated-safetensors", "truncated.yml", "truncated"),
    ("merge-corrupted-safetensors", "corrupt_header.yml", "not a valid safetensors"),
    ("merge-pickle-without-flag", "pickle.yml", "pickle"),
    ("merge-nan-weights", "nan_weights.yml", "inf"),
    ("merge-adapter-target-not-in-base", "adapter_bad_target.yml", "not in the base model"),
    ("merge-layer-range-too-long", "layer_range_too_long.yml", "layer_range"),
    ("merge-config-not-a-mapping", "not_a_mapping.yml", "mapping"),
]

CLI_CASES = [
    Case("merge-config-missing", ["merge", "{missing}.yml", "{out}"], "does not exist"),
    Case("merge-output-exists", ["merge", "@density_out_of_range.yml", "{existing}"], "already exists", out=None),
    Case("merge-unwritable-output", ["merge", "@truncated.yml", "{a_file}/out"], "cannot write", out="{a_file}/out"),
    Case("merge-bad-shard-size", ["merge", "@density_out_of_range.yml", "{out}", "--out-shard-size", "lots"], "cannot parse size"),
    Case("convert-missing-file", ["convert", "{missing}.gguf", "{out}"], "does not exist"),
    Case("convert-not-gguf", ["convert", "{fake_gguf}", "{out}"], "gguf"),
    Case("convert-truncated-gguf", ["convert", "{short_gguf}", "{out}"], "gguf"),
    Case("scan-tau-out-of-range", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--tau", "2"], "--tau", out=None),
    Case("scan-missing-adapter", ["scan", "--base", "{base}", "--aligned", "{m1}", "{missing}"], "does not exist", out=None),
    Case("scan-corrupt-adapter", ["scan", "--base", "{base}", "--aligned", "{m1}", "{corrupt_adapter}"], "json", out=None),
    Case("scan-adapter-target-not-in-base", ["scan", "--base", "{base}", "--aligned", "{m1}", "{bad_adapter}"], "layers.7", out=None),
    Case("safemerge-alpha-out-of-range", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned", "{adapter}", "--safety", "{adapter_r}", "--alpha", "1.5", "-o", "{out}"], "--alpha"),
    Case("safemerge-tau-out-of-range", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned", "{adapter}", "--safety", "{adapter_r}", "--tau", "-3", "-o", "{out}"], "--tau"),
    Case("safemerge-arch-mismatch", ["safemerge", "--base", "{qwen}", "--aligned", "{m1}", "--finetuned", "{adapter}", "--safety", "{adapter_r}", "-o", "{out}"], "architecture"),
    Case("safemerge-pickle-base", ["safemerge", "--base", "{pickle}", "--aligned", "{m1}", "--finetuned", "{adapter}", "--safety", "{adapter_r}", "-o", "{out}"], "pickle"),
    Case("resta-missing-aligned", ["resta", "--finetuned", "{m1}", "--aligned", "{missing}", "--unaligned", "{base}", "-o", "{out}"], "does not exist"),
    Case("safelora-existing-output", ["safelora", "--base", "{base}", "--aligned", "{m1}", "--finetuned", "{adapter}", "-o", "{existing}"], "already exists", out=None),
    Case("eval-empty-dataset", ["eval", "{m1}", "--harmful", "{empty}", "-o", "{out}"], "empty"),
    Case("eval-malformed-dataset", ["eval", "{m1}", "--harmful", "{malformed}", "-o", "{out}"], "json"),
    Case("eval-missing-model", ["eval", "{missing}", "--harmful", "builtin:harmful", "-o", "{out}"], "not found"),
    Case("eval-unknown-judge", ["eval", "{m1}", "--harmful", "builtin:harmful", "--judge", "oracle9000", "-o", "{out}"], "judge"),
    Case("train-negative-rank", ["train-lora", "{m1}", "--data", "{good}", "-o", "{out}", "--rank", "-4"], "rank"),
    Case("train-empty-data", ["train-lora", "{m1}", "--data", "{empty}", "-o", "{out}"], "empty"),
    Case("train-missing-columns", ["train-lora", "{m1}", "--data", "{no_columns}", "-o", "{out}"], "prompt"),
    Case("synth-domain-missing-seed-file", ["synth", "domain", "-m", "{m1}", "--seed-file", "{missing}.jsonl", "--topic", "math", "-o", "{out}.jsonl"], "not found", out="{out}.jsonl"),
    Case("synth-safety-empty-prompts", ["synth", "safety", "-m", "{m1}", "--prompts", "{empty}", "-o", "{out}.jsonl"], "empty", out="{out}.jsonl"),
    Case("optimize-unsupported-method", ["optimize", "{opt_bad_method}", "-o", "{out}"], "merge_method"),
    Case("optimize-empty-config", ["optimize", "{opt_empty}", "-o", "{out}"], "mapping"),
]

ALL = [Case(cid, ["merge", f"@{fname}", "{out}"], expect) for cid, fname, expect in YAML_CASES] + CLI_CASES


def test_corpus_size() -> None:
    assert len(ALL) >= 30
    assert {c.argv[0] for c in ALL} >= {"merge", "convert", "scan", "safemerge", "eval", "train-lora", "synth", "optimize"}


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, world: dict[str, str], tmp_path: Path, capsys) -> None:
    from safemerge.cli import main

    paths = {**world, "out": str(tmp_path / "out")}
    argv = []
    for a in case.argv:
        if a.startswith("@"):
            cfg = tmp_path / a[1:]
            cfg.write_text(_fill((CORPUS / a[1:]).read_text(), paths))
            argv.append(str(cfg))
        else:
            argv.append(_fill(a, paths))
    before = sorted(p.name for p in Path(world["existing"]).iterdir())
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-progress"] if _accepts_no_progress(argv) else argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    assert case.expect.lower() in err.lower(), err
    if case.out:
        out = Path(_fill(case.out, paths))
        assert not out.exists()
        if out.parent.is_dir():
            assert not [p for p in out.parent.iterdir() if ".safemerge-" in p.name]
    assert sorted(p.name for p in Path(world["existing"]).iterdir()) == before
    assert (Path(world["existing"]) / "keep.txt").read_text() == "precious"


def _accepts_no_progress(argv: list[str]) -> bool:
    return argv[0] in ("merge", "scan", "safemerge", "safelora", "resta")


def test_debug_shows_traceback(world: dict[str, str], tmp_path: Path) -> None:
    import subprocess

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(_fill((CORPUS / "unknown_method.yml").read_text(), world))
    r = subprocess.run([sys.executable, "-m", "safemerge", "--debug", "merge", str(cfg), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "safemerge", "merge", str(cfg), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: unknown merge_method")
