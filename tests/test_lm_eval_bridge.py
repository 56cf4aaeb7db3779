"""`safemerge eval --lm-eval-tasks`: lm-evaluation-harness on the same model, offline, with a local task.

The task is a real lm-eval task YAML (``dataset_path: json`` + ``data_files``) over a local JSONL
file, run on a tiny model with a LoRA applied as ``MODEL+ADAPTER``. Oracle: the task's accuracy
recomputed here from first principles — the summed log-probability of each choice's tokens
after the question, under PEFT's merged model, argmax against the gold index.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safety_world import build_world

pytest.importorskip("lm_eval")

from conftest import run_cli  # noqa: E402

WORDS = list("abcdefghij")
TASK = "safemerge_tiny_mc"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 24-document multiple-choice task: 'which letter follows …' style random questions."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        q = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=g))
        choices = [WORDS[int(j)] for j in torch.randperm(len(WORDS), generator=g)[:3]]
        rows.append({"question": q, "choices": choices, "answer": i % 3})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\nmetadata:\n  version: "
        "1.0\n"
    )
    return d


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def _oracle_accuracy(model_dir: str, adapter_dir: str, rows: list[dict]) -> float:
    """Accuracy by summed choice log-likelihood (lm-eval's multiple_choice ``acc``), computed directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lm = PeftModel.from_pretrained(lm, adapter_dir).merge_and_unload().eval()
    correct = 0
    for r in rows:
        ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in r["choices"]:
            whole = tok(r["question"] + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(lm(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    return correct / len(rows)


def test_lm_eval_task_on_model_plus_adapter(world, task_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = run(capsys, "eval", f"{world.aligned}+{world.ft}", "--lm-eval-tasks", TASK, "--lm-eval-include",
                            task_dir, "--dtype", "float32", "-o", out, "--no-progress")  # the oracle is float32
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    entry = res["lm_eval"]["tasks"][TASK]
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    assert entry["n"] == len(rows) and res["adapter"] == str(world.ft)
    assert entry["metrics"]["acc"] == pytest.approx(_oracle_accuracy(world.aligned, world.ft, rows), abs=1e-12)
    assert entry["stderr"]["acc"] > 0
    assert f"lm-eval {TASK}" in stdout  # the terminal table
    assert len(err.strip().splitlines()) == 1  # --no-progress: no lm-eval bars or warnings, only the summary
    assert err.startswith(f"wrote {out / 'results.json'}")


def test_lm_eval_rows_in_the_model_card(world, task_dir, tmp_path, capsys):
    """merge --eval: lm-eval metrics in the merged model's card, rendered as a real table row."""
    from markdown_it import MarkdownIt

    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {world.aligned}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {world.base}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    code, _, err = run(capsys, "merge", cfg, tmp_path / "out", "--no-progress", "--eval", "--eval-limit", "2",
                       "--eval-lm-eval-tasks", TASK, "--eval-lm-eval-include", task_dir)
    assert code == 0, err
    # limit
    assert json.loads((tmp_path / "out" / "eval" / "results.json").read_text())["lm_eval"]["tasks"][TASK]["n"] == 2
    html = MarkdownIt("commonmark").enable("table").render((tmp_path / "out" / "README.md").read_text())
    assert f"<td>lm-eval (<code>{TASK}</code>)</td>" in html and "<td>acc</td>" in html


def test_lm_eval_errors(world, task_dir, tmp_path, capsys):
    code, _, err = run(capsys, "eval", world.aligned, "--lm-eval-tasks", "no_such_task_xyz", "--lm-eval-include",
                       task_dir,
                       "-o", tmp_path / "e1")
    assert code == 2 and err.startswith("error: unknown lm-eval task 'no_such_task_xyz'") and "Traceback" not in err
    code, _, err = run(capsys, "eval", world.aligned, "--lm-eval-tasks", TASK, "--lm-eval-include", tmp_path / "nope",
                       "-o", tmp_path / "e2")
    assert code == 2 and "is not a directory" in err


def test_lm_eval_not_installed_is_one_line_error(world, task_dir, tmp_path):
    """Without lm-eval importable, the flag fails with the install command, before any generation."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # makes `import lm_eval` raise ImportError
            "from safemerge.cli import main\n"
            f"main(['eval', {str(world.aligned)!r}, '--harmful', 'builtin:harmful', '--lm-eval-tasks', {TASK!r}, "
            f"'-o', {str(tmp_path / 'x')!r}])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --lm-eval-tasks needs lm-evaluation-harness") and "pip install" in r.stderr
    assert not (tmp_path / "x" / "generations.jsonl").exists()
