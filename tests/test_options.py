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
