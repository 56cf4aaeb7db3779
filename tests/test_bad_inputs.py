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
    stdin: str | None = None  # run in a subprocess with this on stdin (and a timeout: no hang)


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
    p["vocab"] = str(save_model(make_tiny_model("llama", seed=0, vocab_size=136), root / "vocab",
                                tokenizer=build_tokenizer(136)))
    # truncated and corrupted safetensors
    for name, mutate in (("truncated", lambda b: b[: len(b) // 2]), ("corrupt",
                                                                     lambda b: b[:8] + b"\x00garbage" + b[16:])):
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
        m = get_peft_model(make_tiny_model("llama", seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                        init_lora_weights=False))
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
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}",
                                                         "response": f"answer {i}"}) + "\n" for i in range(4)))
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
    p["root"] = str(root)
    _round_two_fixtures(root, p)
    return p


def _rewrite_header(src: Path, dst: Path, mutate, raw_json=None) -> None:
    """Copy a model directory, rewriting its safetensors header (``mutate(header)`` or raw JSON text)."""
    import struct

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    text = (raw_json(header) if raw_json else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def _two_same_shape(header: dict) -> tuple[str, str]:
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert header[q]["shape"] == header[o]["shape"]
    return q, o


def _round_two_fixtures(root: Path, p: dict[str, str]) -> None:
    """Inputs of issue 11: code-carrying models, lying headers, escaping shards, FIFOs, NaN factors,
    malformed adapter configs, non-UTF-8 files, templates that raise, a GGUF with bad merges."""
    import os

    from safetensors.torch import load_file, save_file

    m1 = Path(p["m1"])
    q_name = "model.layers.0.self_attn.q_proj.weight"
    # a model that needs its own Python code; running it would create PWNED
    d = root / "evil"
    shutil.copytree(m1, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evilmodel", auto_map={"AutoConfig": "evil.EvilConfig",
                                                 "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (d / "evil.py").write_text(f"open({str(root / 'PWNED')!r}, 'w').write('ran')\n")
    p["evil"] = str(d)
    # safetensors headers that lie
    q_off = lambda h: h[q_name]["data_offsets"]  # noqa: E731
    _rewrite_header(m1, root / "neg_offset", lambda h: h[q_name].update(data_offsets=[-128,
                                                                                      q_off(h)[1] - q_off(h)[0] - 128]))
    _rewrite_header(m1, root / "overlap", lambda h: h[_two_same_shape(h)[1]].update(data_offsets=list(q_off(h))))
    _rewrite_header(m1, root / "str_offsets", lambda h: h[q_name].update(data_offsets=[str(x) for x in q_off(h)]))
    _rewrite_header(m1, root / "bad_dtype", lambda h: h[q_name].update(dtype="X99"))
    _rewrite_header(m1, root / "size_mismatch", lambda h: h[q_name].update(shape=[1, 1]))
    _rewrite_header(m1, root / "dup_name", lambda h: None,
                    raw_json=lambda h: json.dumps(h)[:-1] + f', "{q_name}": ' + json.dumps(h[q_name]) + "}")
    for name in ("neg_offset", "overlap", "str_offsets", "bad_dtype", "size_mismatch", "dup_name"):
        p[name] = str(root / name)
    # a shard index that reads from outside the model directory
    (root / "outside").mkdir()
    shutil.copy(m1 / "model.safetensors", root / "outside" / "x.safetensors")
    d = root / "shard_outside"
    d.mkdir()
    shutil.copy(m1 / "config.json", d / "config.json")
    names = list(load_file(m1 / "model.safetensors"))
    weight_map = {n: "../outside/x.safetensors" for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    p["shard_outside"] = str(d)
    # model.safetensors a symlink to a named pipe; a shard index naming a pipe
    os.mkfifo(root / "pipe")
    d = root / "fifo"
    d.mkdir()
    shutil.copy(m1 / "config.json", d / "config.json")
    (d / "model.safetensors").symlink_to(root / "pipe")
    p["fifo"] = str(d)
    d = root / "fifo_shard"
    d.mkdir()
    shutil.copy(m1 / "config.json", d / "config.json")
    os.mkfifo(d / "model-00001-of-00001.safetensors")
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    p["fifo_shard"] = str(d)
    for name in ("pipe.jsonl", "pipe.yml"):
        os.mkfifo(root / name)
        p[name.replace(".", "_")] = str(root / name)
    # a dangling symlink as OUT, and a symlink to an input
    (root / "dangling").symlink_to(root / "nowhere")
    p["dangling"] = str(root / "dangling")
    (root / "link_to_m1").symlink_to(m1)
    p["link_to_m1"] = str(root / "link_to_m1")
    # adapters: NaN factor, malformed configs, rank mismatch
    ad = Path(p["adapter"])
    d = root / "nan_adapter"
    shutil.copytree(ad, d)
    sd = load_file(d / "adapter_model.safetensors")
    next(v for k, v in sd.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(sd, str(d / "adapter_model.safetensors"))
    p["nan_adapter"] = str(d)
    acfg = json.loads((ad / "adapter_config.json").read_text())
    for name, change in (("alpha_str", {"lora_alpha": "sixteen"}), ("bad_regex", {"rank_pattern": {"q_proj[": 4}}),
                         ("rank_mismatch", {"r": 8, "lora_alpha": 16})):
        d = root / f"adapter_{name}"
        shutil.copytree(ad, d)
        (d / "adapter_config.json").write_text(json.dumps({**acfg, **change}))
        p[f"adapter_{name}"] = str(d)
    d = root / "adapter_list"
    shutil.copytree(ad, d)
    (d / "adapter_config.json").write_text(json.dumps([acfg]))
    p["adapter_list"] = str(d)
    # a model whose chat template raises; a model with an Inf for the safety commands is p["nan"]
    d = root / "raising_template"
    shutil.copytree(m1, d)
    (d / "chat_template.jinja").write_text("{{ raise_exception('this template refuses to render') }}")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    p["raising_template"] = str(d)
    d = root / "sandbox_template"
    shutil.copytree(d.parent / "raising_template", d)
    (d / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    p["sandbox_template"] = str(d)
    # data files
    (root / "latin1.jsonl").write_bytes(json.dumps({"prompt": "caf\u00e9"}).replace("\\u00e9",
                                                                                    "\xe9").encode("latin-1") + b"\n")
    (root / "latin1.txt").write_bytes("caf\xe9 question\n".encode("latin-1"))
    (root / "mc_out_of_range.jsonl").write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"],
                                                            "answer": 7}) + "\n")
    (root / "messages_not_objects.jsonl").write_text(json.dumps({"messages": ["hello", "there"]}) + "\n")
    for k in ("latin1.jsonl", "latin1.txt", "mc_out_of_range.jsonl", "messages_not_objects.jsonl"):
        p[k.replace(".", "_")] = str(root / k)
    (root / "list_results").mkdir()
    (root / "list_results" / "results.json").write_text("[1, 2, 3]")
    p["list_results"] = str(root / "list_results")
    # optimize configs: non-UTF-8, alias bomb in genome.parameters, an error after validation
    genome = f"genome:\n  models: [{p['m1']}, {p['m2']}]\n  merge_method: linear\n"
    (root / "opt_latin1.yml").write_bytes((genome + "# caf\xe9\n").encode("latin-1"))
    bomb = "".join(f"    {c}: &{c} [{', '.join([f'*{chr(ord(c) - 1)}'] * 10)}]\n" for c in "bcdefgh")
    (root / "opt_bomb.yml").write_text(genome + "  parameters:\n    a: &a [x, x, x, x, x, x, x, x, x, x]\n" + bomb
                                        + f"data:\n  safety: {p['good']}\n")
    (root / "opt_no_data.yml").write_text(genome + f"data:\n  safety: {p['empty']}\n")
    (root / "opt_into_input.yml").write_text(genome + f"data:\n  safety: {p['good']}\n")
    for k in ("opt_latin1", "opt_bomb", "opt_no_data", "opt_into_input"):
        p[k] = str(root / f"{k}.yml")
    p["deep"] = "[" * 5000 + "]" * 5000
    # a GGUF whose tokenizer merges name a token missing from the vocabulary
    from test_gguf_convert import write_tiny_gguf

    (root / "gguf").mkdir()
    write_tiny_gguf(root / "gguf" / "bad_merges.gguf", extra_merges=("zzq qqz",))
    p["bad_merges_gguf"] = str(root / "gguf" / "bad_merges.gguf")
    p["gguf_dir"] = str(root / "gguf")


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
    Case("merge-bad-shard-size", ["merge", "@density_out_of_range.yml", "{out}", "--out-shard-size", "lots"],
         "cannot parse size"),
    Case("convert-missing-file", ["convert", "{missing}.gguf", "{out}"], "does not exist"),
    Case("convert-not-gguf", ["convert", "{fake_gguf}", "{out}"], "gguf"),
    Case("convert-truncated-gguf", ["convert", "{short_gguf}", "{out}"], "gguf"),
    Case("scan-tau-out-of-range", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--tau", "2"], "--tau",
         out=None),
    Case("scan-missing-adapter", ["scan", "--base", "{base}", "--aligned", "{m1}", "{missing}"], "does not exist",
         out=None),
    Case("scan-corrupt-adapter", ["scan", "--base", "{base}", "--aligned", "{m1}", "{corrupt_adapter}"], "json",
         out=None),
    Case("scan-adapter-target-not-in-base", ["scan", "--base", "{base}", "--aligned", "{m1}", "{bad_adapter}"],
         "layers.7", out=None),
    Case("safemerge-alpha-out-of-range", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned",
                                          "{adapter}", "--safety", "{adapter_r}", "--alpha", "1.5", "-o", "{out}"],
                                          "--alpha"),
    Case("safemerge-tau-out-of-range", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned",
                                        "{adapter}", "--safety", "{adapter_r}", "--tau", "-3", "-o", "{out}"], "--tau"),
    Case("safemerge-negative-safety-gain", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned",
                                            "{adapter}", "--safety", "{adapter_r}", "--safety-gain", "-1", "-o",
                                            "{out}"], "--safety-gain"),
    Case("safemerge-negative-min-layer", ["safemerge", "--base", "{base}", "--aligned", "{m1}", "--finetuned",
                                          "{adapter}", "--safety", "{adapter_r}", "--min-layer", "-1", "-o", "{out}"],
         "--min-layer"),
    Case("safemerge-arch-mismatch", ["safemerge", "--base", "{qwen}", "--aligned", "{m1}", "--finetuned", "{adapter}",
                                     "--safety", "{adapter_r}", "-o", "{out}"], "architecture"),
    Case("safemerge-pickle-base", ["safemerge", "--base", "{pickle}", "--aligned", "{m1}", "--finetuned", "{adapter}",
                                   "--safety", "{adapter_r}", "-o", "{out}"], "pickle"),
    Case("resta-missing-aligned", ["resta", "--finetuned", "{m1}", "--aligned", "{missing}", "--unaligned", "{base}",
                                   "-o", "{out}"], "does not exist"),
    Case("safelora-existing-output", ["safelora", "--base", "{base}", "--aligned", "{m1}", "--finetuned", "{adapter}",
                                      "-o", "{existing}"], "already exists", out=None),
    Case("eval-empty-dataset", ["eval", "{m1}", "--harmful", "{empty}", "-o", "{out}"], "empty"),
    Case("eval-malformed-dataset", ["eval", "{m1}", "--harmful", "{malformed}", "-o", "{out}"], "json"),
    Case("eval-missing-model", ["eval", "{missing}", "--harmful", "builtin:harmful", "-o", "{out}"], "not found"),
    Case("eval-unknown-judge", ["eval", "{m1}", "--harmful", "builtin:harmful", "--judge", "oracle9000", "-o", "{out}"],
         "judge"),
    Case("train-negative-rank", ["train-lora", "{m1}", "--data", "{good}", "-o", "{out}", "--rank", "-4"], "rank"),
    Case("train-empty-data", ["train-lora", "{m1}", "--data", "{empty}", "-o", "{out}"], "empty"),
    Case("train-missing-columns", ["train-lora", "{m1}", "--data", "{no_columns}", "-o", "{out}"], "prompt"),
    Case("synth-domain-missing-seed-file", ["synth", "domain", "-m", "{m1}", "--seed-file", "{missing}.jsonl",
                                            "--topic", "math", "-o", "{out}.jsonl"], "not found", out="{out}.jsonl"),
    Case("synth-safety-empty-prompts", ["synth", "safety", "-m", "{m1}", "--prompts", "{empty}", "-o", "{out}.jsonl"],
         "empty", out="{out}.jsonl"),
    Case("optimize-unsupported-method", ["optimize", "{opt_bad_method}", "-o", "{out}"], "merge_method"),
    Case("optimize-empty-config", ["optimize", "{opt_empty}", "-o", "{out}"], "mapping"),
]

# Issue 11 (round two): code execution, destroyed inputs, lying headers, non-finite weights, internal errors.
_SAFEMERGE = ["safemerge", "--base", "{base}", "--aligned", "{m1}"]
_EVAL_M1 = ["eval", "{m1}", "--limit", "1", "--no-progress"]
ROUND_TWO_CASES = [
    # 1. never run code from an input ("y" on stdin would accept transformers' prompt)
    Case("train-custom-code", ["train-lora", "{evil}", "--data", "{good}", "-o", "{out}", "--steps", "1"],
         "custom python code", stdin="y\n"),
    Case("eval-custom-code", ["eval", "{evil}", "--harmful", "builtin:harmful", "--limit", "1", "-o", "{out}"],
         "custom python code", stdin="y\n"),
    # 2. never destroy an input: OUT is, contains or lies inside an input — with --force too
    Case("merge-out-is-input", ["merge", "@good_linear.yml", "{m1}", "--force"], "is the input", out=None),
    Case("merge-out-contains-inputs", ["merge", "@good_linear.yml", "{root}", "--force"], "contains the input",
         out=None),
    Case("merge-out-inside-input", ["merge", "@good_linear.yml", "{m1}/merged", "--force"], "lies inside the input",
         out="{m1}/merged"),
    Case("merge-out-symlink-to-input", ["merge", "@good_linear.yml", "{link_to_m1}", "--force"], "is the input",
         out=None),
    Case("safemerge-out-is-input", [*_SAFEMERGE, "--finetuned", "{adapter}", "--safety", "{adapter_r}", "-o",
                                    "{adapter}", "--force"], "is the input", out=None),
    Case("safelora-out-is-input", ["safelora", "--base", "{base}", "--aligned", "{m1}", "--finetuned", "{adapter}",
                                   "-o", "{base}", "--force"], "is the input", out=None),
    Case("resta-out-is-input", ["resta", "--finetuned", "{m2}", "--aligned", "{m1}", "--unaligned", "{base}", "-o",
                                "{m1}", "--force"], "is the input", out=None),
    Case("mergealign-out-is-input", ["mergealign", "--pretrained", "{base}", "--domain", "{m2}", "--aligned", "{m1}",
                                     "-o", "{m2}", "--force"], "is the input", out=None),
    Case("train-out-is-input", ["train-lora", "{m1}", "--data", "{good}", "-o", "{m1}", "--force"], "is the input",
         out=None),
    Case("convert-out-contains-input", ["convert", "{bad_merges_gguf}", "{gguf_dir}", "--force"], "contains the input",
         out=None),
    Case("optimize-out-is-input", ["optimize", "{opt_into_input}", "-o", "{m1}", "--force"], "is the input", out=None),
    Case("synth-out-is-input", ["synth", "safety", "-m", "{m1}", "--prompts", "{good}", "-o", "{good}", "--force"],
         "is the input", out=None),
    Case("eval-out-is-input", ["eval", "{m1}", "--harmful", "builtin:harmful", "-o", "{m1}"], "is the input", out=None),
    Case("demo-out-is-input", ["demo", "--fast", "-o", "{m1}", "--cache-dir", "{m1}"], "is the input", out=None),
    Case("optimize-error-leaves-no-work-dir", ["optimize", "{opt_no_data}", "-o", "{out}"], "no safety records"),
    # 3. never read bytes wrongly
    Case("merge-negative-offset", ["merge", "@header_neg_offset.yml", "{out}"], "negative"),
    Case("merge-overlapping-tensors", ["merge", "@header_overlap.yml", "{out}"], "overlaps"),
    Case("merge-duplicate-tensor-name", ["merge", "@header_dup_name.yml", "{out}"], "duplicate tensor name"),
    Case("merge-string-offsets", ["merge", "@header_str_offsets.yml", "{out}"], "invalid data_offsets"),
    Case("merge-unknown-dtype", ["merge", "@header_bad_dtype.yml", "{out}"], "unknown dtype"),
    Case("merge-size-not-dtype-times-shape", ["merge", "@header_size_mismatch.yml", "{out}"], "needs"),
    Case("merge-shard-outside-model-dir", ["merge", "@header_shard_outside.yml", "{out}"],
         "outside the model directory"),
    Case("merge-safetensors-symlink-to-fifo", ["merge", "@header_fifo.yml", "{out}"], "named pipe", stdin=""),
    Case("merge-shard-is-fifo", ["merge", "@header_fifo_shard.yml", "{out}"], "named pipe", stdin=""),
    Case("eval-set-is-fifo", ["eval", "{m1}", "--harmful", "{pipe_jsonl}", "-o", "{out}"], "named pipe", stdin=""),
    Case("train-data-is-fifo", ["train-lora", "{m1}", "--data", "{pipe_jsonl}", "-o", "{out}"], "named pipe", stdin=""),
    Case("optimize-config-is-fifo", ["optimize", "{pipe_yml}", "-o", "{out}"], "named pipe", stdin=""),
    Case("merge-config-is-fifo", ["merge", "{pipe_yml}", "{out}"], "named pipe", stdin=""),
    # 4. never write or report a non-finite number
    Case("resta-nan-finetuned", ["resta", "--finetuned", "{nan}", "--aligned", "{m1}", "--unaligned", "{base}", "-o",
                                 "{out}"], "inf values"),
    Case("mergealign-inf-domain", ["mergealign", "--pretrained", "{base}", "--domain", "{nan}", "--aligned", "{m1}",
                                   "-o", "{out}"], "inf values"),
    Case("safemerge-merge-into-nan", [*_SAFEMERGE, "--finetuned", "{adapter}", "--safety", "{adapter_r}",
                                      "--merge-into", "{nan}", "--tau", "1", "-o", "{out}"], "inf values"),
    Case("scan-nan-lora-factor", ["scan", "--base", "{base}", "--aligned", "{m1}", "{nan_adapter}"], "nan values",
         out=None),
    Case("safemerge-nan-adapter", [*_SAFEMERGE, "--finetuned", "{nan_adapter}", "--safety", "{adapter_r}", "-o",
                                   "{out}"], "nan values"),
    Case("scan-zero-safety-vector", ["scan", "--base", "{m1}", "--aligned", "{m1}", "{adapter}"], "safety vector",
         out=None),
    Case("scan-targets-match-nothing", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--targets",
                                        "nope_proj"], "match no module", out=None),
    # 5. every remaining internal error
    Case("scan-lora-alpha-string", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter_alpha_str}"],
         "lora_alpha", out=None),
    Case("scan-rank-pattern-bad-regex", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter_bad_regex}"],
         "regular expression", out=None),
    Case("scan-adapter-config-a-list", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter_list}"],
         "json object", out=None),
    Case("eval-adapter-rank-mismatch", [*_EVAL_M1, "--harmful", "builtin:harmful", "--adapter",
                                        "{adapter_rank_mismatch}", "-o", "{out}"], "rank"),
    Case("eval-adapter-module-missing", [*_EVAL_M1, "--harmful", "builtin:harmful", "--adapter", "{bad_adapter}", "-o",
                                         "{out}"], "not in the base model"),
    Case("merge-5000-deep-yaml", ["merge", "@deep.yml", "{out}"], "nested deeper"),
    Case("merge-yaml-alias-bomb", ["merge", "@alias_bomb.yml", "{out}"], "alias"),
    Case("optimize-yaml-alias-bomb", ["optimize", "{opt_bomb}", "-o", "{out}"], "alias"),
    Case("merge-out-dangling-symlink", ["merge", "@good_linear.yml", "{dangling}"], "dangling symlink", out=None),
    Case("eval-out-below-a-file", ["eval", "{m1}", "--harmful", "builtin:harmful", "-o", "{a_file}/eval"],
         "not a directory", out="{a_file}/eval"),
    Case("scan-json-is-a-directory", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--json",
                                      "{existing}"], "is a directory", out=None),
    Case("scan-csv-is-a-directory", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--csv",
                                     "{existing}"], "is a directory", out=None),
    Case("scan-plot-bad-extension", ["scan", "--base", "{base}", "--aligned", "{m1}", "{adapter}", "--plot",
                                     "{out}.xyz"], "image type", out="{out}.xyz"),
    Case("eval-non-utf8-set", ["eval", "{m1}", "--harmful", "{latin1_jsonl}", "-o", "{out}"], "utf-8"),
    Case("synth-non-utf8-prompts", ["synth", "safety", "-m", "{m1}", "--prompts", "{latin1_txt}", "-o", "{out}.jsonl"],
         "utf-8", out="{out}.jsonl"),
    Case("optimize-non-utf8-config", ["optimize", "{opt_latin1}", "-o", "{out}"], "utf-8"),
    Case("eval-mc-answer-out-of-range", ["eval", "{m1}", "--utility", "{mc_out_of_range_jsonl}", "-o", "{out}"],
         "outside the 2 choices"),
    Case("eval-messages-not-objects", ["eval", "{m1}", "--harmful", "{messages_not_objects_jsonl}", "-o", "{out}"],
         "messages"),
    Case("eval-template-raise-exception", [*_EVAL_M1[:1], "{raising_template}", "--limit", "1", "--harmful",
                                           "builtin:harmful", "-o", "{out}"], "chat template"),
    Case("eval-template-sandbox", [*_EVAL_M1[:1], "{sandbox_template}", "--limit", "1", "--harmful", "builtin:harmful",
                                   "-o", "{out}"], "chat template"),
    Case("train-template-raise-exception", ["train-lora", "{raising_template}", "--data", "{good}", "-o", "{out}",
                                            "--steps", "1"], "chat template"),
    Case("convert-gguf-merge-not-in-vocab", ["convert", "{bad_merges_gguf}", "{out}"], "not in the vocabulary"),
    Case("compare-results-a-list", ["compare", "{list_results}", "--plot", "{out}.png"], "results object",
         out="{out}.png"),
    Case("synth-unknown-judge-before-models", ["synth", "safety", "-m", "{missing}", "--prompts", "{good}", "--judge",
                                               "oracle9000", "-o", "{out}.jsonl"], "judge", out="{out}.jsonl"),
]

ALL = ([Case(cid, ["merge", f"@{fname}", "{out}"], expect) for cid, fname, expect in YAML_CASES]
       + CLI_CASES + ROUND_TWO_CASES)


def test_corpus_size() -> None:
    assert len(ALL) >= 100
    assert {c.argv[0] for c in ALL} >= {"merge", "convert", "scan", "safemerge", "eval", "train-lora", "synth",
                                        "optimize"}


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
    snapshot = _snapshot(Path(world["root"]))
    argv = [*argv, "--no-progress"] if _accepts_no_progress(argv) else argv
    if case.stdin is not None:
        code, err = _run_subprocess(argv, case.stdin)
    else:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2, err
    assert _snapshot(Path(world["root"])) == snapshot, "an input changed"
    assert not (Path(world["root"]) / "PWNED").exists(), "code from an input ran"
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


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file contents (hashed), symlink targets, pipes — never opened."""
    import hashlib
    import os
    import stat

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else "special"
    return out


def _run_subprocess(argv: list[str], stdin: str) -> tuple[int, str]:
    """Run the CLI in a child process with ``stdin`` (a prompt could read it) and a time limit (no hang)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-m", "safemerge", *argv], input=stdin, capture_output=True, text=True,
                       timeout=240, env=env)
    return r.returncode, r.stderr


def _accepts_no_progress(argv: list[str]) -> bool:
    return argv[0] in ("merge", "scan", "safemerge", "safelora", "resta", "mergealign")


def test_debug_shows_traceback(world: dict[str, str], tmp_path: Path) -> None:
    import subprocess

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(_fill((CORPUS / "unknown_method.yml").read_text(), world))
    r = subprocess.run([sys.executable, "-m", "safemerge", "--debug", "merge", str(cfg), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "safemerge", "merge", str(cfg), str(tmp_path / "o")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: unknown merge_method")
