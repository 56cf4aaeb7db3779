"""The Ray path (local mode, 2 CPU actors) gives the same trace as the serial path."""
from __future__ import annotations

import json

import pytest
import torch
from optimize_world import build_world, config

from safemerge.options import RunOptions

QUIET = RunOptions(progress=False)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("rayworld"))


def test_ray_local_mode_matches_serial(world, tmp_path):
    from safemerge.optimize import optimize
    from safemerge.optimize.runner import RayPool

    cfg = config(world, method="dare_ties", granularity=1, max_evals=4, popsize=4, ray={"workers": 1,
                                                                                        "cpus_per_worker": 1})
    serial = optimize(cfg, tmp_path / "serial", options=QUIET, save_model=False)
    par = optimize(cfg, tmp_path / "ray", ray=RayPool(), options=QUIET, save_model=False)
    assert par["ray"] and not serial["ray"]
    a = [json.loads(x) for x in (tmp_path / "serial" / "trace.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ray" / "trace.jsonl").read_text().splitlines()]
    assert [r["x"] for r in a] == [r["x"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert (tmp_path / "serial" / "best.yml").read_text() == (tmp_path / "ray" / "best.yml").read_text()
    assert not ray.is_initialized()  # the backend shut down the Ray instance it started
