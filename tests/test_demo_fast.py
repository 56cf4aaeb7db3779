"""``safemerge demo --fast``: the whole pipeline on the tiny world, through the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cli(argv, capsys):
    from safemerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the same cache root as tests/test_world_behaviour.py: one world build per pytest process
    root = tmp_path_factory.getbasetemp() / "safemerge-world-cache"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def demo_out(cache, tmp_path_factory):
    import torch

    from safemerge.demo.pipeline import run_demo

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    result = run_demo(out=out, fast=True, cache_dir=cache, alphas=(0.6, 0.8, 0.9))
    return out, result


def test_demo_writes_every_artifact(demo_out):
    out, _ = demo_out
    for name in ("report.md", "summary.json", "scan.json", "heatmap.png", "safety_vs_utility.png",
                 "autotune.json", "autotune.png", "tau_sweep.png", "repaired_model_card.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.parent.iterdir() if ".safemerge-tmp-" in p.name]


def test_every_number_traces_to_a_results_file(demo_out):
    out, result = demo_out
    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["base", "aligned", "safety LoRA alone", "fine-tuned", "SafeMERGE", "SafeMERGE (auto)", "uniform α",
                     "SafeLoRA", "RESTA"]
    report = (out / "report.md").read_text()
    for row in summary["rows"]:
        res = json.loads((out / row["files"] / "results.json").read_text())
        assert res["harmful"]["harmful_rate"] == row["harmful_rate"]
        assert res["utility"]["accuracy"] == row["utility"]
        assert res["benign"]["over_refusal_rate"] == row["over_refusal_rate"]
        assert f"| {row['name']} |" in report
        assert f"{100 * row['harmful_rate']:.1f}%" in report
        # the per-suite generations are shipped with the results
        assert (out / row["files"] / "harmful" / "generations.jsonl").is_file()
    at = json.loads((out / "autotune.json").read_text())
    chosen = summary["autotune"]["paper regime"]
    assert at["chosen"]["tau"] == chosen["tau"] and at["chosen"]["alpha"] == chosen["alpha"]
    assert at["chosen"]["rung"] == "full"
    assert any(p["chosen"] for p in at["points"]) and at["pareto_front"]


def test_demo_rows_show_the_story(demo_out):
    _, result = demo_out
    rows = {r.name: r.to_dict() for r in result.rows}
    assert rows["base"]["harmful_rate"] >= 0.9, "the base model complies with harmful requests"
    assert result.checks["paper regime"]["erosion"], "fine-tuning raises the harmful rate"
    assert rows["SafeMERGE (auto)"]["harmful_rate"] <= rows["fine-tuned"]["harmful_rate"]


def test_cli_rerun_is_cached_and_prints_table(cache, demo_out, tmp_path, capsys):
    out = tmp_path / "again"
    code, stdout, stderr = _cli(["demo", "--fast", "--cache-dir", str(cache), "-o", str(out), "--alphas",
                                 "0.6,0.8,0.9"], capsys)
    assert code == 0, stderr
    assert "[build]" not in stderr and "[cached]" in stderr
    assert "SafeMERGE" in stdout and "Pareto" in stdout
    # same inputs + seed => identical numbers
    a = json.loads((out / "summary.json").read_text())["rows"]
    b = json.loads((demo_out[0] / "summary.json").read_text())["rows"]
    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("model", "adapter", "files")} for r in rows]

    assert strip(a) == strip(b)


def test_cli_user_errors(tmp_path, capsys):
    other = tmp_path / "not-a-demo"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, _, err = _cli(["demo", "--fast", "--cache-dir", str(tmp_path / "c"), "-o", str(other)], capsys)
    assert code == 2 and "not a demo output" in err and "hint:" in err
    assert (other / "keep.txt").exists()
    (tmp_path / "data").mkdir()
    code, _, err = _cli(["demo", "--fast", "--data-dir", str(tmp_path / "data"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "--fast and --data-dir" in err
    code, _, err = _cli(["demo", "--fast", "--alphas", "x", "-o", str(tmp_path / "o2")], capsys)
    assert code == 2 and "--alphas" in err


def test_safemerge_cli_tau_alpha_auto(cache, demo_out, tmp_path, capsys):
    """`safemerge safemerge --tau auto --alpha auto` on the world: picks, prints and plots the front."""
    from safemerge.demo.world import build_world

    w = build_world(cache / "world")
    out = tmp_path / "merged"
    argv = ["safemerge", "--base", str(w.base), "--aligned", str(w.aligned), "--finetuned", str(w.task),
            "--safety", str(w.safety), "-o", str(out), "--tau", "auto", "--alpha", "auto",
            "--val-harmful", w.val_sets["harmful"], "--val-utility", w.val_sets["utility"], "-q", "--no-progress"]
    os.environ["SAFEMERGE_CACHE"] = str(cache)
    try:
        code, stdout, stderr = _cli(argv, capsys)
    finally:
        del os.environ["SAFEMERGE_CACHE"]
    assert code == 0, stderr
    at = json.loads((out / "autotune.json").read_text())
    # which point wins (a τ point or a late-block one) depends on the generations, which depend on the CPU's
    # evaluation dtype (bf16 where native); the printed choice must be the recorded one either way
    chosen = at["chosen"]
    where = f"blocks ≥ {chosen['min_layer']}" if chosen["min_layer"] else f"τ = {chosen['tau']:g}"
    assert "Pareto" in stdout and f"chosen: {where}, α = {chosen['alpha']:g}" in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and (out / "autotune.png").is_file()
    # the same rule as the demo's automatic row
    demo_at = json.loads((demo_out[0] / "autotune.json").read_text())
    assert at["chosen"]["harmful_rate"] <= at["aligned"]["harmful_rate"] + 0.02 or not at["constraint_met"]
    assert at["rhos"] == demo_at["rhos"]
    code, _, err = _cli(["safemerge", "--base", str(w.base), "--aligned", str(w.aligned), "--finetuned", str(w.task),
                         "--safety", str(w.safety), "-o", str(tmp_path / "m2"), "--tau", "auto"], capsys)
    assert code == 2 and "--val-harmful" in err
    code, _, err = _cli(["safemerge", "--base", str(w.base), "--aligned", str(w.aligned), "--finetuned", str(w.task),
                         "--safety", str(w.safety), "-o", str(tmp_path / "m3"), "--tau", "x"], capsys)
    assert code == 2 and "--tau must be a number or 'auto'" in err


def test_the_automatic_row_is_safemerge_repair(demo_out):
    """The demo's SafeMERGE (auto) row is `safemerge repair` on the zoo: its adapter, card and test numbers."""
    out, result = demo_out
    rows = {r.name: r for r in result.rows}
    auto = rows["SafeMERGE (auto)"]
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["autotune"]["paper regime"]
    card = (out / "repaired_model_card.md").read_text()
    assert "## Repair: before / after" in card
    where = f"blocks ≥ {chosen['min_layer']}" if chosen["min_layer"] else f"τ = {chosen['tau']:g}"
    assert f"{where}, α = {chosen['alpha']:g}" in card
    repair_json = json.loads((Path(auto.adapter) / "repair.json").read_text())
    by_name = {r["name"]: r for r in repair_json["rows"]}
    assert by_name["repaired"]["harmful_rate"] == auto.to_dict()["harmful_rate"]
    assert by_name["aligned"]["over_refusal_rate"] == rows["aligned"].to_dict()["over_refusal_rate"]
    assert by_name["fine-tuned"]["utility"] == rows["fine-tuned"].to_dict()["utility"]
