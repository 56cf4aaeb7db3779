"""Hugging Face Hub ids wherever a model or adapter path is accepted (safemerge.io.hub).

No network and no mocks: each test publishes real model and adapter directories into a temporary
Hugging Face cache with huggingface_hub's own layout (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` → symlink to the blob, ``refs/<branch>`` holding the commit), sets
``HF_HOME`` to it and ``HF_HUB_OFFLINE=1``, and runs the commands with ids instead of paths.
Oracle: the same command with the local paths gives byte-identical outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli  # noqa: E402
from safety_world import build_world

from safemerge.errors import CheckpointError
from safemerge.io.hub import parse_hub_id, resolve_local, resolve_model_ref

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "89abcdef0123456789abcdef0123456789abcdef"


def publish(cache: Path, repo: str, src: Path, *, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``src``'s files into ``cache`` exactly as ``snapshot_download`` leaves them."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture()
def hub(world, tmp_path, monkeypatch):
    """An offline HF cache holding the world's models under Hub ids."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    publish(cache, "org/base", Path(world.base))
    publish(cache, "org/aligned", Path(world.aligned))
    publish(cache, "org/aligned", Path(world.aligned), commit=COMMIT_V1, refs=("v1",))
    publish(cache, "org/ft-lora", Path(world.ft))
    publish(cache, "org/safety-lora", Path(world.safety))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("mistralai/Mistral-7B-v0.1@main") == ("mistralai/Mistral-7B-v0.1", "main")
    assert parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for not_an_id in ("/abs/path", "./rel/dir", "~/models/x", "name", "a/b/c", "../up/x", "org/name@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_ids_resolve_to_cached_snapshots(hub, world):
    snap = resolve_local("org/base")
    assert snap == hub / "models--org--base" / "snapshots" / COMMIT
    assert (snap / "model.safetensors").read_bytes() == (Path(world.base) / "model.safetensors").read_bytes()
    assert resolve_local("org/aligned@v1").name == COMMIT_V1  # a branch/tag through refs/<name>
    assert resolve_local(f"org/aligned@{COMMIT}").name == COMMIT  # a commit hash directly
    model, adapter = resolve_model_ref("org/aligned+org/ft-lora")
    assert model.name == COMMIT and (adapter / "adapter_config.json").is_file()
    local = Path(world.base)
    assert resolve_local(local) == local  # an existing path is never looked up


def test_local_path_wins_over_hub_id(hub, world, tmp_path, monkeypatch):
    """A relative directory spelled like a Hub id is used as the directory it is."""
    shutil.copytree(world.aligned, tmp_path / "org" / "base")
    monkeypatch.chdir(tmp_path)
    assert resolve_local("org/base") == Path("org/base")
    from safemerge.io.references import open_checkpoint

    name = "model.layers.0.self_attn.q_proj.weight"
    assert open_checkpoint("org/base").get(name).equal(open_checkpoint(str(world.aligned)).get(name))


def test_missing_id_offline_is_one_line_error(hub, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"org/missing.*not in the local Hugging Face cache") as exc:
        resolve_local("org/missing")
    assert "hf download org/missing" in exc.value.hint
    with pytest.raises(CheckpointError, match="hf download org/aligned --revision v9"):
        resolve_local("org/aligned@v9")
    cfg = tmp_path / "m.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: org/base\n    parameters: {weight: 0.5}\n"
                   "  - model: org/nope\n    parameters: {weight: 0.5}\ndtype: float32\n")
    code, out, err = run(capsys, "merge", cfg, tmp_path / "out", "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: 'org/nope' is not a local "
                          "path") and "hint: fetch it once online: hf download org/nope" in err
    assert not (tmp_path / "out").exists()


def _merge_yaml(base: str, other: str, tok: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {other}\n"
            f"    parameters: {{weight: 0.7}}\n  - model: {base}\n    parameters: {{weight: 0.3}}\n"
            f"tokenizer_source: {tok}\ndtype: float32\n")


def test_merge_with_hub_ids_equals_local_paths(hub, world, tmp_path, capsys):
    local = _merge_yaml(world.base, f"{world.aligned}+{world.ft}", world.aligned)
    ids = _merge_yaml("org/base", "org/aligned@v1+org/ft-lora", "org/aligned")
    for name, text in (("local", local), ("ids", ids)):
        (tmp_path / f"{name}.yml").write_text(text)
        code, _, err = run(capsys, "merge", tmp_path / f"{name}.yml", tmp_path / name, "--no-progress")
        assert code == 0, err
    weights = "model.safetensors"
    assert (tmp_path / "ids" / weights).read_bytes() == (tmp_path / "local" / weights).read_bytes()
    assert (tmp_path / "ids" / "tokenizer.json").is_file()
    card = (tmp_path / "ids" / "README.md").read_text()
    assert "base_model: org/base" in card  # the card names the Hub id, not the cache path


def test_scan_and_safemerge_with_hub_ids(hub, world, tmp_path, capsys):
    for name, refs in (("local", (world.base, world.aligned, world.ft, world.safety)),
                       ("ids", ("org/base", "org/aligned", "org/ft-lora", "org/safety-lora"))):
        base, aligned, ft, safety = refs
        code, _, err = run(capsys, "scan", "--base", base, "--aligned", aligned, ft, "--json",
                           tmp_path / f"{name}.json",
                           "--no-progress", "-q")
        assert code == 0, err
        code, _, err = run(capsys, "safemerge", "--base", base, "--aligned", aligned, "--finetuned", ft, "--safety",
                           safety,
                           "-o", tmp_path / f"sm_{name}", "--no-progress", "-q")
        assert code == 0, err
    rho = [r["rho"] for r in json.loads((tmp_path / "local.json").read_text())]
    assert rho == [r["rho"] for r in json.loads((tmp_path / "ids.json").read_text())]
    a, b = tmp_path / "sm_local" / "adapter_model.safetensors", tmp_path / "sm_ids" / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_eval_with_hub_model_and_adapter(hub, world, tmp_path, capsys):
    for name, ref in (("local", f"{world.aligned}+{world.ft}"), ("ids", "org/aligned+org/ft-lora")):
        code, _, err = run(capsys, "eval", ref, "--harmful", "builtin:harmful", "--limit", "2", "--max-new-tokens", "4",
                           "-o", tmp_path / name, "--no-progress")
        assert code == 0, err
    def responses(run: str) -> list[str]:
        lines = (tmp_path / run / "generations.jsonl").read_text().splitlines()
        return [json.loads(line)["response"] for line in lines]

    assert responses("local") == responses("ids")


def test_incomplete_cache_entry_is_reported(hub, tmp_path, capsys):
    """A snapshot without weights (e.g. an interrupted download) is named, not a traceback."""
    snap = hub / "models--org--base" / "snapshots" / COMMIT
    shutil.copytree(snap, tmp_path / "keep", symlinks=True)
    (snap / "model.safetensors").unlink()
    code, _, err = run(capsys, "scan", "--base", "org/base", "--aligned", "org/aligned", "org/ft-lora", "--no-progress")
    assert code == 2 and "Traceback" not in err and "not a model directory" in err


def test_resta_and_train_lora_with_hub_ids(hub, world, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a b {c}", "response": f"{c} d"}) + "\n" for c in "efgh"))
    for name, refs in (("local", (world.base, world.aligned, world.ft)), ("ids", ("org/base", "org/aligned",
                                                                                  "org/ft-lora"))):
        base, aligned, ft = refs
        code, _, err = run(capsys, "resta", "--unaligned", base, "--aligned", aligned, "--finetuned", ft,
                           "-o", tmp_path / f"resta_{name}", "-q")
        assert code == 0, err
        code, _, err = run(capsys, "train-lora", f"{aligned}+{ft}", "--data", data, "-o", tmp_path / f"lora_{name}",
                           "--rank", "2", "--steps", "2", "--batch-size", "2", "-q")
        assert code == 0, err
    for a, b in (("resta_local/model.safetensors", "resta_ids/model.safetensors"),
                 ("lora_local/adapter_model.safetensors", "lora_ids/adapter_model.safetensors")):
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes(), a


def test_a_hub_id_has_the_identity_of_its_snapshot_on_every_path(hub, world):
    """The generation cache's identity of a Hub id is its snapshot's content fingerprint — the same as the local
    copy's, whether computed before loading (evaluate) or by the loaded generator — and follows the revision."""
    from safemerge.evaluate.generate import load_generator, model_identity

    local = model_identity(world.aligned, world.ft)
    assert model_identity("org/aligned", "org/ft-lora") == local
    assert model_identity("org/aligned+org/ft-lora") == local
    assert load_generator("org/aligned", adapter="org/ft-lora", backend="hf", device="cpu").identity == local
    assert model_identity("org/aligned@v1") == model_identity(world.aligned)  # same files under another revision
    assert model_identity("org/base") != model_identity("org/aligned")


def test_identity_of_a_missing_model_is_a_clear_error(tmp_path):
    from safemerge.evaluate.generate import model_identity

    with pytest.raises(CheckpointError, match="model not found"):
        model_identity(tmp_path / "nothing-here")
