"""``safemerge optimize``: run a strategy, checkpoint, and write the output directory.

Output directory ``OUT`` (assembled in the hidden sibling ``.OUT.safemerge-optimize`` and
renamed into place when complete):

* ``best.yml`` — the best candidate as a mergekit-compatible merge config;
* ``trace.jsonl`` — one line per evaluation (loss parts, timings, decoded parameters);
* ``trace.png`` — the optimisation trace; ``report.md`` and ``summary.json`` — the run summary;
* ``model/`` — the merged model (``safemerge merge best.yml``), unless ``save_model=False``;
* ``eval/`` — with ``evaluate``: the evaluation harness's results for ``model/`` (Table-1 row in
  ``report.md`` and ``summary.json``).

An interrupted EvoMM run leaves the work directory with ``cma_state.pkl``; rerunning the same
command with ``resume=True`` continues the same run (the config must be unchanged).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError, option
from safemerge.optimize.config import OptimizeConfig, load_optimize_config
from safemerge.optimize.trace import Trace
from safemerge.options import RunOptions

WORK_SUFFIX = ".safemerge-optimize"


def work_dir_for(out: Path) -> Path:
    """The hidden sibling where an optimize run is assembled (and can be resumed from)."""
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def optimize_inputs(cfg: OptimizeConfig, config: Any) -> list[Any]:
    """Every path an optimize run reads: the config file, the pool, the tokenizer source, the data."""
    g = cfg.genome
    return [config if isinstance(config, (str, Path)) else None, *g.models, g.base_model, g.tokenizer_source,
            *cfg.data.safety, *cfg.data.expert]


def _prepare_work(out: Path, run_key: dict[str, Any], *, resume: bool, force: bool,
                  inputs: list[Any]) -> tuple[Path, bool]:
    from safemerge.io.output import check_not_an_input, check_output_path

    check_output_path(out, force=True, inputs=inputs)  # not an input, writable; existence is handled here
    check_not_an_input(work_dir_for(out), inputs)
    if out.exists() and not force:
        raise SafemergeError(f"output {str(out)!r} already exists", f"pass {option('force')} to replace it, or choose another path")
    work = work_dir_for(out)
    resumed = False
    if work.exists():
        prev = None
        try:
            prev = json.loads((work / "run.json").read_text())
        except (OSError, ValueError):
            prev = None
        if resume:
            if prev != run_key:
                raise SafemergeError(f"the interrupted run in {work} used a different config or strategy",
                                     f"rerun with the original config, or pass {option('force')} to start over")
            resumed = True
        elif force:
            shutil.rmtree(work)
        else:
            raise SafemergeError(f"an interrupted run of this output exists ({work})",
                                 f"pass {option('resume')} to continue it, or {option('force')} to start over")
    elif resume:
        raise SafemergeError(f"there is no interrupted run to resume for {str(out)!r}", "run without --resume")
    if not resumed:
        work.mkdir(parents=True)
        (work / "run.json").write_text(json.dumps(run_key, indent=1, sort_keys=True))
    return work, resumed


def _finalize(work: Path, out: Path, *, force: bool) -> None:
    from safemerge.io.output import promote_directory

    promote_directory(work, out, force=force)


def run_optimize(
    config: str | Path | dict[str, Any] | OptimizeConfig,
    out: str | Path,
    *,
    strategy: str | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    resume: bool = False,
    force: bool = False,
    save_model: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_generation: Callable[[int, int], None] | None = None,
    evaluate: Callable[[Path, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run safety-aware data-driven merging and write ``out`` (see module docstring).

    Args:
        config: optimize YAML path, dict or parsed config.
        out: output directory.
        strategy: ``evomm`` | ``cocktail`` | ``grid`` (overrides the config's ``strategy``).
        ray / ray_address / ray_workers: evaluate candidates on Ray actors.
        resume: continue an interrupted run of the same config into the same ``out``.
        force: replace an existing output (and discard an interrupted run).
        save_model: also write the merged model to ``out/model``.
        on_generation: EvoMM hook ``(generation, evals)`` called after each checkpoint.
        evaluate: ``evaluate(model_dir, eval_dir) -> results`` run on the merged model before the
            output is renamed into place (e.g. :func:`safemerge.evaluate.api.evaluate`); its
            Table-1 row goes into ``report.md`` and ``summary.json`` (needs ``save_model``).

    Returns:
        The summary dict (also written to ``out/summary.json``).
    """
    if evaluate is not None and not save_model:
        raise SafemergeError("evaluating the result needs the merged model", "drop --no-save-model, or drop --eval")
    cfg = load_optimize_config(config)
    if strategy:
        if strategy not in ("evomm", "cocktail", "grid"):
            raise SafemergeError(f"unknown strategy {strategy!r}", "use --strategy evomm, cocktail or grid")
        cfg = cfg.model_copy(update={"strategy": strategy})
    use_ray = bool(ray or ray_address)
    out_p = Path(out).expanduser().absolute()
    run_key = {"config": cfg.model_dump(mode="json"), "strategy": cfg.strategy}
    work, resumed = _prepare_work(out_p, run_key, resume=resume, force=force, inputs=optimize_inputs(cfg, config))
    try:
        return _run_in_work(cfg, work, out_p, resumed=resumed, use_ray=use_ray, ray_address=ray_address,
                            ray_workers=ray_workers, force=force, save_model=save_model, device=device,
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress,
                            on_generation=on_generation, evaluate=evaluate)
    except Exception:
        # an error (not an interruption) leaves nothing behind: a fresh run's work directory goes,
        # a resumed run's checkpoint stays for the next --resume
        if not resumed:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run_in_work(cfg: OptimizeConfig, work: Path, out_p: Path, *, resumed: bool, use_ray: bool, ray_address: str | None,
                 ray_workers: int | None, force: bool, save_model: bool, device: str, allow_pickle: bool,
                 trust_remote_code: bool, progress: bool, on_generation: Callable[[int, int], None] | None,
                 evaluate: Callable[[Path, Path], dict[str, Any]] | None) -> dict[str, Any]:
    """The search, the report and the merged model, assembled in ``work`` and promoted to ``out_p``."""
    import yaml

    from safemerge.io.references import open_checkpoint
    from safemerge.optimize import report
    from safemerge.optimize.candidate import CandidateEvaluator, SerialBackend, build_genome
    from safemerge.progress import progress_bar

    trace = Trace(work / "trace.jsonl")

    t_setup = time.perf_counter()
    if use_ray:
        from safemerge.optimize.ray_backend import RayBackend

        anchor = cfg.genome.base_model or cfg.genome.models[0]
        genome = build_genome(cfg, open_checkpoint(anchor, options=RunOptions(allow_pickle=allow_pickle)))
        r = cfg.ray
        backend: Any = RayBackend(cfg.model_dump(mode="json"), workers=ray_workers or r.workers, address=ray_address or r.address,
                                  cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker, device=device,
                                  allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        n_safety = n_expert = None
    else:
        ev = CandidateEvaluator(cfg, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        genome, backend = ev.genome, SerialBackend(ev)
        n_safety, n_expert = ev.n_safety, ev.n_expert
    setup_s = time.perf_counter() - t_setup

    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    try:
        if cfg.strategy == "evomm":
            from safemerge.optimize.evomm import default_popsize, run_evomm

            pop = cfg.cma.popsize or default_popsize(max(2, len(genome)))
            total = max(1, -(-cfg.cma.max_evals // pop)) * pop
            with progress_bar("optimize (CMA-ES)", total=total, enabled=progress, unit="candidates") as bar:
                done = [0]

                def _tick(evals: int, _total: int) -> None:
                    bar.advance(n=evals - done[0])
                    done[0] = evals

                res = run_evomm(genome, backend, cfg.cma, work, trace, resume=resumed, on_generation=on_generation, progress=_tick)
            best_cfg = genome.to_config(res["x"])
            extra = {"generations": res["generations"], "popsize": res["popsize"], "final_sigma": res["sigma"]}
        elif cfg.strategy == "grid":
            from safemerge.optimize.grid import grid_points, run_grid

            trace.truncate(0)
            with progress_bar("optimize (grid)", total=len(grid_points(genome, cfg.grid)), enabled=progress, unit="candidates") as bar:
                res = run_grid(genome, backend, cfg.grid, trace, progress=lambda i, n: bar.advance(n=1))
            best_cfg = genome.to_config(res["x"])
            extra = {"grid_point": res["point"]}
        else:
            from safemerge.optimize.cocktail import cocktail_config, run_cocktail

            trace.truncate(0)
            pool = list(dict.fromkeys(cfg.genome.models))
            res = run_cocktail(pool, backend, cfg.cocktail.temperature, trace)
            best_cfg = cocktail_config(pool, res["weights"], dtype=cfg.genome.dtype, tokenizer_source=cfg.genome.tokenizer_source)
            res["loss"] = None
            extra = {"model_losses": dict(zip(pool, res["losses"])), "weights": dict(zip(pool, res["weights"])),
                     "temperature": cfg.cocktail.temperature}
    finally:
        backend.close()
    search_s = time.perf_counter() - t0

    (work / "best.yml").write_text(yaml.safe_dump(best_cfg, sort_keys=False), encoding="utf-8")
    rows = trace.read()
    per_cand = [float(r.get("merge_s", 0)) + float(r.get("score_s", 0)) for r in rows]
    summary: dict[str, Any] = {
        "strategy": cfg.strategy,
        "merge_method": best_cfg["merge_method"] if cfg.strategy == "cocktail" else cfg.genome.merge_method,
        "genes": len(genome) if cfg.strategy != "cocktail" else len(cfg.genome.models),
        "evaluations": len(rows),
        "best_loss": res.get("loss"),
        "best_eval": res.get("eval"),
        "n_safety": n_safety,
        "n_expert": n_expert,
        "alpha": cfg.objective.alpha,
        "resumed": resumed,
        "ray": use_ray,
        "setup_seconds": round(setup_s, 3),
        "search_seconds_this_session": round(search_s, 3),
        "seconds_per_candidate": round(sum(per_cand) / len(per_cand), 4) if per_cand else None,
        "candidates_per_hour": round(3600 * len(per_cand) / sum(per_cand), 1) if per_cand and sum(per_cand) > 0 else None,
        **extra,
    }
    if rows:
        report.plot_trace(rows, work / "trace.png", title=f"{cfg.strategy} ({summary['merge_method']})")
    (work / "cma_state.pkl").unlink(missing_ok=True)
    if save_model:
        from safemerge.api import merge

        if (work / "model").exists():  # a previous attempt died while merging or evaluating
            shutil.rmtree(work / "model")
        merge(best_cfg, work / "model", options=RunOptions(seed=cfg.seed, device=device, allow_pickle=allow_pickle,
                                                           progress=progress, threads=1))
        if evaluate is not None:
            shutil.rmtree(work / "eval", ignore_errors=True)
            evaluation = evaluate(work / "model", work / "eval")
            summary["evaluation"] = report.row_from_eval(report.method_label(cfg.strategy, summary["merge_method"]),
                                                         report.data_label(n_safety, n_expert), evaluation)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "report.md").write_text(report.run_report_markdown(summary, best_cfg), encoding="utf-8")
    _finalize(work, out_p, force=force)
    return summary
