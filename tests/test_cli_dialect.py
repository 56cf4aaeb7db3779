"""One CLI dialect: the same flag means the same thing everywhere, quiet runs are quiet, outputs follow
the user's umask, train-lora is byte-identical across processes, model cards render, and the README's
Python API example works."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli  # noqa: E402
from safety_world import build_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def _params() -> dict[str, list]:
    """command path → its click parameters."""
    import typer

    from safemerge.cli import app

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        for sub_name, sub in (getattr(cmd, "commands", None) or {name: cmd}).items():
            out[name if sub is cmd else f"{name} {sub_name}"] = sub.params
    return out


def test_flags_mean_the_same_everywhere():
    """-o is always --out (--output only as a hidden alias); -q is always --quiet, with one help text."""
    helps: set[str] = set()
    for cmd, params in _params().items():
        for p in params:
            opts = set(getattr(p, "opts", []))
            if "-o" in opts:
                assert "--out" in opts, f"{cmd}: -o is {sorted(opts)}"
            if "--output" in opts:
                assert getattr(p, "hidden", False), f"{cmd}: --output must be a hidden alias of -o/--out"
            if "-q" in opts:
                assert opts == {"-q", "--quiet"}, cmd
                helps.add(p.help)
    assert len(helps) == 1
    with_q = {c for c, ps in _params().items() if any("-q" in getattr(p, "opts", []) for p in ps)}
    assert {"merge", "eval", "scan", "safemerge", "safelora", "resta", "mergealign", "train-lora", "convert",
            "optimize", "synth safety", "synth domain", "compare"} <= with_q


def test_output_alias_still_works(world, tmp_path, capsys):
    code, _, err = run(capsys, "synth", "safety", "--prompts", "builtin:harmful", "-n", "1", "-m", world.aligned,
                       "--max-new-tokens", "2", "--output", tmp_path / "s.jsonl", "-q")
    assert code == 2 and "no model of the pool refused" in err  # it ran: the alias named the output
    code, _, err = run(capsys, "synth", "safety", "--prompts", "builtin:harmful", "-m", world.aligned)
    assert code == 2 and "missing option -o/--out" in err


def _cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with library progress output NOT pre-silenced by the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    env["HF_HUB_OFFLINE"] = "1"
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, env=env,
                          timeout=600, preexec_fn=pre)


def test_quiet_means_one_summary_line(world, tmp_path):
    """-q (and --no-progress) silence every bar, transformers' "Loading weights" included."""
    r = _cli("eval", str(world.aligned), "--harmful", "builtin:harmful", "--limit", "2", "--max-new-tokens", "3",
             "-o", str(tmp_path / "ev"), "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"^wrote .*results\.json, .*judgments\.jsonl \([\d.]+ [KM]?B\) in [\d.]+ s$",
                                        lines[0])
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {world.aligned}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {world.base}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    r = _cli("merge", str(cfg), str(tmp_path / "m"), "--no-progress", "--eval", "--eval-limit", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'm'} (") and "Loading weights" not in r.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(world, tmp_path, umask, mode):
    ev = tmp_path / "ev"
    r = _cli("eval", str(world.aligned), "--harmful", "builtin:harmful", "--limit", "1", "--max-new-tokens", "2",
             "-o", str(ev), "-q", umask=umask)
    assert r.returncode == 0, r.stderr
    r = _cli("compare", str(ev), "--plot", str(tmp_path / "c.png"), umask=umask)
    assert r.returncode == 0, r.stderr
    for f in (ev / "results.json", ev / "judgments.jsonl", ev / "generations.jsonl", tmp_path / "c.png"):
        assert f.stat().st_mode & 0o777 == mode, f


def test_train_lora_byte_identical_across_processes(world, tmp_path):
    """Set order (PEFT's target_modules) changes with PYTHONHASHSEED; the adapter must not."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a b {c}", "response": f"{c} d"}) + "\n" for c in "efghij"))
    outs = []
    for hashseed in ("1", "2"):
        out = tmp_path / f"run{hashseed}" / "lora"  # same name: the card names the adapter directory
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-m", "safemerge", "train-lora", str(world.aligned), "--data", str(data),
                            "-o", str(out), "--targets", "all-linear", "--rank", "2", "--steps", "3", "--batch-size",
                            "2",
                            "--lora-dropout", "0.1", "-q"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_log.json", "README.md"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    cfg = json.loads((outs[0] / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.1 and cfg["target_modules"] == sorted(cfg["target_modules"])
    log = json.loads((outs[0] / "training_log.json").read_text())
    assert log["hyperparameters"]["lora_dropout"] == 0.1


def test_dropout_changes_training(world, tmp_path, capsys):
    """--lora-dropout is really applied: with the same seed, 0.5 dropout gives different weights than none."""
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a b {c}", "response": f"{c} d"}) + "\n" for c in "efghij"))
    for p in ("0.0", "0.5"):
        code, _, err = run(capsys, "train-lora", world.aligned, "--data", data, "-o", tmp_path / p, "--rank", "2",
                           "--steps", "3", "--batch-size", "2", "--lora-dropout", p, "-q")
        assert code == 0, err
    a, b = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("0.0", "0.5"))
    assert any(not (a[k] == b[k]).all() for k in a)


def test_model_cards_render_code_spans_verbatim(world, tmp_path, capsys):
    """No backslash escapes inside code spans: the rendered HTML shows names exactly as written."""
    from markdown_it import MarkdownIt

    from safemerge.evaluate.report import results_markdown

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a b", "response": "c d"}) + "\n")
    out = tmp_path / "my_lora_v1"
    code, _, err = run(capsys, "train-lora", world.aligned, "--data", data, "-o", out, "--rank", "2", "--steps", "1",
                       "-q")
    assert code == 0, err
    md = MarkdownIt("commonmark").enable("table")
    html = md.render((out / "README.md").read_text())
    assert f"<code>{Path(world.aligned).name}+my_lora_v1</code>" in html
    assert not re.search(r"<code>[^<]*\\[^<]*</code>", html)
    res = {"harmful": {"harmful_rate": 0.5, "refusal_rate": 0.5, "n": 2, "judge": "keyword", "set": "my_set|v_2*x"},
           "settings": {}}
    html = md.render(results_markdown(res))
    assert "<td>harmful (<code>my_set|v_2*x</code>)</td>" in html


def test_readme_api_example_and_api_hints(world, tmp_path):
    """``import safemerge; safemerge.api.merge(...)`` works in a fresh interpreter; API errors name
    ``force=True``, the CLI names ``--force``."""
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(world.aligned), "parameters": {"weight": 0.5}},
                      {"model": str(world.base), "parameters": {"weight": 0.5}}]}
    code = (f"import safemerge\nfrom safemerge.options import RunOptions\ncfg = {cfg!r}\nout = "
            f"{str(tmp_path / 'api')!r}\n"
            "safemerge.api.merge(cfg, out, options=RunOptions(progress=False))\n"
            "try:\n    safemerge.api.merge(cfg, out, options=RunOptions(progress=False))\n"
            "except safemerge.SafemergeError as e:\n    print('HINT', e.hint)\n"
            "print(safemerge.evaluate.api.evaluate.__name__, safemerge.safety.api.scan.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "api" / "model.safetensors").is_file()
    hint = next(line for line in r.stdout.splitlines() if line.startswith("HINT"))
    assert "force=True" in hint and "--force" not in hint
    assert "evaluate scan" in r.stdout
    readme = (REPO / "README.md").read_text()
    assert "safemerge.api.merge(" in readme and "import safemerge" in readme
