"""The one options object (issue 12, item 4): safe defaults, validation, the CLI's single builder, and
the migrated library functions taking ``options`` instead of the shared flags one by one."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from safemerge.errors import ConfigError
from safemerge.options import DEFAULT, RunOptions, or_default


def test_defaults_are_the_safe_ones() -> None:
    o = RunOptions()
    assert (o.allow_pickle, o.allow_nonfinite, o.trust_remote_code, o.force) == (False, False, False, False)
    assert (o.dtype, o.device, o.seed, o.threads, o.progress) == (None, "cpu", 0, None, True)
    assert or_default(None) is DEFAULT and or_default(o) is o


def test_frozen_and_replace_makes_a_copy() -> None:
    o = RunOptions(seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.seed = 4  # type: ignore[misc]
    p = o.replace(allow_nonfinite=True)
    assert (o.allow_nonfinite, p.allow_nonfinite, p.seed) == (False, True, 3)


@pytest.mark.parametrize("kw, match", [({"device": "tpu"}, "unknown device"), ({"device": "cuda:x"}, "unknown device"),
                                       ({"threads": 0}, "threads")])
def test_bad_values_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunOptions(**kw)


def test_cli_builder_maps_the_shared_flags() -> None:
    from safemerge.cli.options import run_options

    o = run_options(quiet=False, no_progress=False, jobs=2, seed=7, device="cuda:1", dtype="bfloat16", force=True,
                    allow_pickle=True, allow_nonfinite=True, trust_remote_code=True)
    assert o == RunOptions(allow_pickle=True, allow_nonfinite=True, trust_remote_code=True, force=True,
                           dtype="bfloat16", device="cuda:1", seed=7, threads=2, progress=True)
    assert not run_options(quiet=True).progress and not run_options(no_progress=True).progress
    assert run_options() == RunOptions()


def test_migrated_functions_take_options_not_the_shared_flags() -> None:
    from safemerge import api, extract
    from safemerge.engine import run, tensorwise
    from safemerge.io import adapter, checkpoint, hub, references
    from safemerge.repair import pipeline
    from safemerge.safety import api as safety_api

    functions = [api.merge, run.merge_in_memory, run.execute_plan, run.open_all, tensorwise.write_plan,
                 checkpoint.Checkpoint, references.open_checkpoint, adapter.load_adapter, hub.resolve_local,
                 hub.resolve_model_ref, safety_api.scan, safety_api.safemerge_adapters, safety_api.safelora,
                 safety_api.resta, safety_api.mergealign, extract.extract_lora, pipeline.repair]
    shared = {f.name for f in dataclasses.fields(RunOptions)} | {"jobs"}
    shared -= {"progress"}  # the safety API's progress is a callback (stage, done, total), not the bar switch
    for fn in functions:
        params = set(inspect.signature(fn).parameters)
        assert "options" in params, fn.__qualname__
        assert not params & shared, (fn.__qualname__, params & shared)


# Parameters that keep a name of a RunOptions field on purpose: the generation's own device and dtype (chosen
# for the hardware when None, unlike RunOptions' cpu / output storage dtype; evaluate() has them in its
# GenerationSettings).
OWN_OR_LEGACY = {
    "load_generator": {"device", "dtype"},
    "self_distill": {"dtype"},
}


def test_evaluate_optimize_synth_train_and_convert_take_options() -> None:
    from safemerge.evaluate import api as eval_api
    from safemerge.evaluate import generate
    from safemerge.io import gguf
    from safemerge.optimize import candidate, ray_backend, runner
    from safemerge.synth import common, domain, safety, structured
    from safemerge.train import distill, lora, safety_lora

    functions = [eval_api.evaluate, generate.load_generator, common.load_generator, runner.run_optimize,
                 candidate.CandidateEvaluator, ray_backend.RayBackend, lora.train_lora, safety_lora.train_safety_lora,
                 gguf.convert_gguf, safety.generate_unsafe_questions, safety.answer_with_pool, safety.select_refusals,
                 safety.build_safety_set, domain.build_domain_set, structured.build_structured_domain_set,
                 distill.self_distill]
    shared = {f.name for f in dataclasses.fields(RunOptions)} | {"jobs"}
    for fn in functions:
        params = set(inspect.signature(fn).parameters)
        assert "options" in params, fn.__qualname__
        allowed = OWN_OR_LEGACY.get(fn.__name__, set())
        assert not (params & shared) - allowed, (fn.__qualname__, params & shared)


def test_no_library_code_resolves_option_keywords() -> None:
    """One way to pass seed/progress/dtype: ``options=``; the keyword path (``with_keywords``) is gone."""
    from pathlib import Path

    import safemerge

    src = Path(safemerge.__file__).parent
    assert not [p for p in src.rglob("*.py") if "with_keywords" in p.read_text(encoding="utf-8")]


def test_eval_command_builds_one_options_object(monkeypatch, tmp_path) -> None:
    """`safemerge eval` hands evaluate() the flags as one RunOptions (progress off with -q)."""
    from safemerge.cli import main
    from safemerge.evaluate import api as eval_api

    seen = {}

    def fake_evaluate(model, sets, **kw):
        seen.update(kw)
        return {"harmful": {"harmful_rate": 0.0, "refusal_rate": 1.0, "n": 1, "ci": None}}

    monkeypatch.setattr(eval_api, "evaluate", fake_evaluate)
    main(["eval", str(tmp_path / "m"), "--harmful", "builtin:harmful", "-o", str(tmp_path / "out"), "-q",
          "--allow-pickle", "--trust-remote-code"])
    assert seen["options"] == RunOptions(allow_pickle=True, trust_remote_code=True, progress=False)
    assert not {"allow_pickle", "trust_remote_code", "progress"} & seen.keys()

