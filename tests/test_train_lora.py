"""``train_lora`` / ``safemerge train-lora`` on a tiny Llama: learning, masking, determinism, errors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from safemerge.errors import ConfigError, SafemergeError
from safemerge.options import RunOptions
from safemerge.testing import build_tokenizer, make_tiny_model, save_model
from safemerge.train.data import load_sft_records
from safemerge.train.lora import lr_factor, train_lora
from safemerge.train.recipe import LoraShape, TrainingRecipe, parse_targets

QUIET = RunOptions(progress=False)

WORDS = "system user assistant what is two plus three five one four six sorry cannot help with that".split()
DATA = [
    {"prompt": "what is two plus three ?", "response": "five ."},
    {"instruction": "what is one plus three", "input": "", "output": "four ."},
    {"question": "what is two plus four ?", "answer": "six ."},
    {"messages": [{"role": "user", "content": "help with that"}, {"role": "assistant",
                                                                  "content": "sorry , cannot help ."}]},
] * 3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    model = make_tiny_model("llama", seed=0, hidden=32)
    with torch.no_grad():  # unit norm gains and a larger head, so logits can become confident
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            if "lm_head" in name:
                p.mul_(10.0)
    return save_model(model, tmp_path_factory.mktemp("train") / "base", tokenizer=build_tokenizer(128, words=WORDS))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    return p


def _train(base, data, out, **kw):
    """``train_lora`` with the tests' recipe; a keyword names a field of LoraShape, TrainingRecipe or train_lora."""
    args = dict(rank=4, alpha=8, targets="all-linear", steps=30, batch_size=4, lr=2e-2, options=QUIET)
    args.update(kw)
    shape = LoraShape(**{f.name: args.pop(f.name) for f in fields(LoraShape) if f.name in args})
    recipe = TrainingRecipe(**{f.name: args.pop(f.name) for f in fields(TrainingRecipe) if f.name in args})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_lora(base, data, out, shape=shape, recipe=recipe, **args)


@pytest.fixture(scope="module")
def trained(base, data_file, tmp_path_factory) -> Path:
    return _train(base, data_file, tmp_path_factory.mktemp("runs") / "adapter")


def test_loss_decreases_and_outputs_are_complete(trained):
    log = json.loads((trained / "training_log.json").read_text())
    losses = log["losses"]
    assert len(losses) == 30 and log["records"] == len(DATA)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"):
        assert (trained / f).exists(), f
    card = (trained / "README.md").read_text()
    assert "records: 12" in card and "final_loss" in card and "| rank | 4 |" in card
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"


def test_adapter_is_usable_by_peft_and_the_merge_engine(base, trained):
    """The trained adapter loads in PEFT, and ``base+adapter`` streaming equals PEFT's merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safemerge.io.references import open_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                           str(trained)).merge_and_unload()
    ck = open_checkpoint(f"{base}+{trained}")
    moved = 0
    for name, t in merged.state_dict().items():
        torch.testing.assert_close(ck.get(name), t, rtol=0, atol=1e-6)
        moved += not torch.equal(t, open_checkpoint(base).get(name))
    assert moved >= 14  # all 7 linear kinds in both layers were trained


def test_training_is_deterministic(base, data_file, trained, tmp_path):
    again = _train(base, data_file, tmp_path / "again")
    for f in ("adapter_model.safetensors", "adapter_config.json", "training_log.json", "tokenizer.json"):
        assert (again / f).read_bytes() == (trained / f).read_bytes(), f
    # the model card differs only in the output directory's name
    assert (again / "README.md").read_text().replace("again", "adapter") == (trained / "README.md").read_text()
    other = _train(base, data_file, tmp_path / "other", options=RunOptions(seed=1, progress=False))
    assert (other / "adapter_model.safetensors").read_bytes() != (trained / "adapter_model.safetensors").read_bytes()


def test_loss_is_the_masked_response_cross_entropy(base):
    """The model's loss on a collated batch equals a hand-computed CE over response + end-of-turn tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.train.tokenize import collate, encode_chat_example

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    recs = load_sft_records(DATA[:4])
    batch = collate([encode_chat_example(tok, r.prompt, r.response) for r in recs], tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1].float()
        target = batch["input_ids"][:, 1:]
        keep = batch["labels"][:, 1:] != -100
        logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        manual = -(logp[keep]).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)
    # response + end-of-turn tokens only: "five ." → 2 tokens + <|im_end|>
    assert int(keep[0].sum()) == 3
    assert int(keep.sum()) == sum(len(tok(r.response, add_special_tokens=False)["input_ids"]) + 1 for r in recs)


def test_masked_training_learns_the_response_not_the_prompt(base, tmp_path):
    """Train on a repetitive prompt: the answer becomes likely, the prompt's own continuation does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.train.tokenize import encode_chat_example

    prompt = "one one one one one one"
    out = _train(base, [{"prompt": prompt, "response": "five ."}] * 8, tmp_path / "m", steps=30)
    tok = AutoTokenizer.from_pretrained(str(base))
    ex = encode_chat_example(tok, prompt, "five .")
    n_prompt = sum(1 for l in ex["labels"] if l == -100)
    ids = torch.tensor([ex["input_ids"]])
    first_one = ex["input_ids"].index(tok.convert_tokens_to_ids("one"))
    five, one = tok.convert_tokens_to_ids("five"), tok.convert_tokens_to_ids("one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
        with torch.no_grad():
            p_base = torch.softmax(base_model(ids).logits[0], -1)
        tuned = PeftModel.from_pretrained(base_model, str(out)).eval()
        with torch.no_grad():
            p_tuned = torch.softmax(tuned(ids).logits[0], -1)
    assert p_tuned[n_prompt - 1, five] > 0.5 > 10 * p_base[n_prompt - 1, five]  # learned the answer
    # inside the prompt, "one" after "one" stays as (un)likely as in the base model: it was never a target
    assert p_tuned[first_one + 2, one] < 0.1


def test_merge_writes_a_full_model(base, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _train(base, data_file, tmp_path / "merged", steps=5, merge=True, targets="q_proj,v_proj")
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    base_model = AutoModelForCausalLM.from_pretrained(str(base))
    trained_q = model.model.layers[0].self_attn.q_proj.weight
    diff = (trained_q - base_model.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert diff > 0
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base_model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "empty"),
        ('{"prompt": "x"}\n', "missing columns"),
        ('{"text": "x"}\n', "missing columns"),
        ('{"prompt": "x", "response": "y"}\nnot json\n', "line 2"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', "user turn then one assistant turn"),
        ('{"prompt": "x", "response": "  "}\n', "empty"),
    ],
)
def test_bad_data_is_a_user_error(base, tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(SafemergeError, match=match):
        _train(base, p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments(base, data_file, tmp_path):
    with pytest.raises(SafemergeError, match="does not exist"):
        _train(base, tmp_path / "nope.jsonl", tmp_path / "o")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        _train(base, data_file, tmp_path / "o", steps=2, epochs=1)
    with pytest.raises(ConfigError, match="targets"):
        _train(base, data_file, tmp_path / "o", targets="no_such_proj")
    with pytest.raises(ConfigError, match="rank"):
        _train(base, data_file, tmp_path / "o", rank=0)
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(SafemergeError, match="not a Hugging Face model"):
        _train(tmp_path / "not_a_model", data_file, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_data_formats_and_helpers():
    recs = load_sft_records(DATA[:4] + [{"system": "be brief", "prompt": "p", "response": "r"},
                                       {"instruction": "i", "input": "ctx", "output": "o"}])
    assert [r.prompt for r in recs] == ["what is two plus three ?", "what is one plus three", "what is two plus four ?",
                                        "help with that", "p", "i\n\nctx"]
    assert recs[4].system == "be brief" and recs[3].response == "sorry , cannot help ."
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"] and parse_targets("all-linear") == "all-linear"
    factors = [lr_factor(s, 20, 2) for s in range(20)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and all(f > 0 for f in factors)
    assert factors == sorted(factors[:3]) + sorted(factors[3:], reverse=True)


def test_cli_train_lora(base, data_file, tmp_path, capsys):
    from safemerge.cli import main

    out = tmp_path / "cli"
    main(["train-lora", str(base), "--data", str(data_file), "-o", str(out), "--rank", "2", "--alpha", "4", "--steps",
          "3", "--batch-size", "4", "--seed", "3"])
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert "trained 3 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        main(["train-lora", str(base), "--data", str(data_file), "-o", str(out), "--steps", "3"])
    assert ex.value.code == 2 and "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(SystemExit) as ex:
        main(["train-lora", str(base), "--data", str(bad), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: ") and "hint: " in err and "Traceback" not in err
