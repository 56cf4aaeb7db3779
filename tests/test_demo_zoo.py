"""Zoo mechanics: cache location, skip-if-exists steps, stable fingerprints, data-dir validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from safemerge.cache import cache_root, fingerprint
from safemerge.demo import zoo as Z
from safemerge.errors import SafemergeError


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"  # --cache-dir wins
    monkeypatch.delenv("SAFEMERGE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "safemerge"


def test_cache_root_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SafemergeError) as exc:
        cache_root(blocker / "sub")
    assert exc.value.hint and "--cache-dir" in exc.value.hint


def test_cached_step_skips_existing_and_builds_missing(tmp_path):
    calls, said = [], []

    def build(out: Path) -> None:
        calls.append(out)
        out.mkdir()

    out = tmp_path / "step"
    Z.cached_step("s", out, build, said.append)
    Z.cached_step("s", out, build, said.append)
    assert calls == [out]
    assert said[0].startswith("[build]") and said[1].startswith("[cached]")


def test_interrupted_step_leaves_nothing(tmp_path):
    from safemerge.io.output import atomic_output

    def build(out: Path) -> None:
        with atomic_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Z.cached_step("s", tmp_path / "step", build)
    assert not (tmp_path / "step").exists() and list(tmp_path.iterdir()) == []


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint(Z.asdict(Z.TASK_RECIPE)) != fingerprint(Z.asdict(Z.STRESS_TASK_RECIPE))


def test_recipe_records_keep_their_cache_names():
    """The zoo's expensive model cache is keyed by these records: a refactoring must not rename a directory."""
    got = [fingerprint(Z.asdict(r)) for r in (Z.ALIGN_RECIPE, Z.TASK_RECIPE, Z.STRESS_TASK_RECIPE)]
    assert got + [fingerprint(Z.SAFETY_SETTINGS)] == ["0ff4141e51", "2e2d853a1d", "52473addd8", "5166c90250"]


def test_safety_lora_is_the_safety_lora_command_shaped_like_the_task(monkeypatch, tmp_path):
    # SafeMERGE merges layer-wise: the zoo trains the safety LoRA with `safety-lora`'s function, which copies the
    # task LoRA's rank and targets (`--like`), with the command's defaults and the aligned model's own answers
    import safemerge.train.safety_lora as S

    seen = {}
    monkeypatch.setattr(Z, "train_safety_lora", lambda aligned, like, out, **kw: seen.update(like=like, **kw))
    Z._train_safety(tmp_path / "aligned", tmp_path / "task", [{"prompt": "p", "response": "r"}], tmp_path / "out")
    assert seen["like"] == tmp_path / "task" and seen["evaluate"] is False and seen["distill_benign"] is True
    assert seen["distilled_per_record"] == Z.SAFETY_SETTINGS["distilled_per_record"] == S.DISTILLED_PER_RECORD
    r = seen["recipe"]
    assert (r.steps, r.lr, r.batch_size, r.max_length) == (S.SAFETY_STEPS, S.SAFETY_LR, S.SAFETY_BATCH,
                                                           S.SAFETY_MAX_LENGTH)
    assert r.precision == Z.SAFETY_SETTINGS["precision"]
    assert seen["options"].seed == Z.SAFETY_SETTINGS["seed"] and "seed" not in seen  # one way: the options object


def test_project_data_sets_are_disjoint_roles():
    s = Z.project_data_sets()
    assert len(s["eval_harmful"]) >= 250 and len(s["eval_benign"]) >= 250 and len(s["eval_utility"]) >= 200
    assert len(s["val_harmful"]) >= 150 and len(s["val_utility"]) >= 100
    train = {r["prompt"] for r in s["harmful_train"] + s["safety_train"]} | set(s["benign_train_prompts"])
    for held in ("val_harmful", "val_benign", "val_utility", "eval_harmful", "eval_benign", "eval_utility"):
        assert not train & {r["prompt"] for r in s[held]}, held
    # the safety LoRA learns refusals the aligned SFT never saw (other goals, other wording)
    assert not {r["prompt"] for r in s["safety_train"]} & {r["prompt"] for r in s["harmful_train"]}
    assert not {r["prompt"] for r in s["task_train"]} & {r["prompt"] for r in s["eval_utility"] + s["val_utility"]}


def test_real_data_dir_is_validated(tmp_path):
    with pytest.raises(SafemergeError) as exc:
        Z.real_data_sets(tmp_path)
    assert "bianchi_safety_only.json" in exc.value.message and exc.value.hint


def test_real_data_sets_from_shared_datasets():
    d = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    if not (d / "bianchi_safety_only.json").exists():
        pytest.skip("../shared/datasets not present")
    s = Z.real_data_sets(d)
    # issue 17 item 7: >= 250 harmful / 250 benign / 200 utility test items, >= 150 + 100 validation items
    assert len(s["harmful_train"]) == 630 and len(s["safety_train"]) == 208 + len(Z.safety_lora_records())
    # both genres of the harm test in validation: Bianchi's instructions and short direct requests
    assert sum(r["id"].startswith("bianchi-val-") for r in s["val_harmful"]) == 84
    assert sum(r["id"].startswith("bianchi-val-") for r in s["val_harmful"][:32]) == 16  # the screen sees both
    # the data cache is keyed by the records: another split gives another key
    assert Z.real_data_sets(d, n_safety=200)["fingerprint"] != s["fingerprint"] == Z.real_data_sets(d)["fingerprint"]
    assert len(s["eval_harmful"]) == 300 and len(s["eval_benign"]) == 250 and len(s["eval_utility"]) == 200
    assert len(s["val_harmful"]) == 168 and len(s["val_utility"]) == 200 and len(s["val_benign"]) == 250
    assert {r.get("label") for r in s["eval_benign"]} == {"safe"}
    assert sum(r.get("label") == "unsafe" for r in s["eval_harmful"]) == 200
    train = {r["prompt"] for r in s["harmful_train"]}
    assert not train & {r["prompt"] for r in s["safety_train"]}
    assert not {r["prompt"] for r in s["val_harmful"]} & (train | {r["prompt"] for r in s["safety_train"]})
    assert not {r["prompt"] for r in s["task_train"]} & {r["prompt"] for r in s["eval_utility"] + s["val_utility"]}


def test_degenerate_generations_are_detected():
    from safemerge.train.distill import is_degenerate

    loop = "Podánek, zdáměně!\n\n" * 5
    assert is_degenerate(loop)
    assert is_degenerate("the the the the the the the the the the the the the the")
    ok = "To knock out a wall, first check that it is not load-bearing.\n\n1. Turn off power.\n2. Remove drywall."
    assert not is_degenerate(ok)
