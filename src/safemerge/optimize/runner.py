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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safemerge.api import merge
from safemerge.errors import SafemergeError, option
from safemerge.evaluate.generate import resolve_dtype
from safemerge.io.output import check_not_an_input, check_output_path, promote_directory
from safemerge.io.references import open_checkpoint
from safemerge.optimize import report
from safemerge.optimize.candidate import CandidateEvaluator, SerialBackend, build_genome
from safemerge.optimize.cocktail import cocktail_config, run_cocktail
from safemerge.optimize.config import OptimizeConfig, load_optimize_config
from safemerge.optimize.evomm import default_popsize, run_evomm
from safemerge.optimize.grid import grid_points, run_grid
from safemerge.optimize.ray_backend import RayBackend
from safemerge.optimize.trace import Trace
from safemerge.options import RunOptions, or_default
from safemerge.progress import progress_bar

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

    check_output_path(out, force=True, inputs=inputs)  # not an input, writable; existence is handled here
    check_not_an_input(work_dir_for(out), inputs)
    if out.exists() and not force:
        raise SafemergeError(f"output {str(out)!r} already exists",
                             f"pass {option('force')} to replace it, or choose another path")
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
    promote_directory(work, out, force=force)


@dataclass(frozen=True)
class RayPool:
    """Evaluate candidates on Ray actors: a running cluster's ``address`` (``None``: a local Ray) and the number of
    ``workers`` (``None``: the config's ``ray.workers``)."""

    address: str | None = None
    workers: int | None = None


def run_optimize(
    config: str | Path | dict[str, Any] | OptimizeConfig,
    out: str | Path,
    *,
    strategy: str | None = None,
    ray: RayPool | None = None,
    resume: bool = False,
    save_model: bool = True,
    options: RunOptions | None = None,
    on_generation: Callable[[int, int], None] | None = None,
    evaluate: Callable[[Path, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run safety-aware data-driven merging and write ``out`` (see module docstring).

    Args:
        config: optimize YAML path, dict or parsed config.
        out: output directory.
        strategy: ``evomm`` | ``cocktail`` | ``grid`` (overrides the config's ``strategy``).
        ray: evaluate candidates on Ray actors (:class:`RayPool`; ``None``: in this process).
        resume: continue an interrupted run of the same config into the same ``out``.
        save_model: also write the merged model to ``out/model``.
        options: ``force`` (replace an existing output and discard an interrupted run), ``device`` of the
            resident model and the merges, ``allow_pickle``, ``allow_nonfinite`` (pool models with NaN/Inf),
            ``trust_remote_code``, ``progress``; the seed is the config's ``seed``.
        on_generation: EvoMM hook ``(generation, evals)`` called after each checkpoint.
        evaluate: ``evaluate(model_dir, eval_dir) -> results`` run on the merged model before the
            output is renamed into place (e.g. :func:`safemerge.evaluate.api.evaluate`); its
            Table-1 row goes into ``report.md`` and ``summary.json`` (needs ``save_model``).

    Returns:
        The summary dict (also written to ``out/summary.json``).
    """
    options = or_default(options)
    if evaluate is not None and not save_model:
        raise SafemergeError("evaluating the result needs the merged model", "drop --no-save-model, or drop --eval")
    cfg = load_optimize_config(config)
    if strategy:
        if strategy not in ("evomm", "cocktail", "grid"):
            raise SafemergeError(f"unknown strategy {strategy!r}", "use --strategy evomm, cocktail or grid")
        cfg = cfg.model_copy(update={"strategy": strategy})
    # "auto" becomes this machine's dtype here, once: the run key, Ray's actors and the summary all see it
    cfg = cfg.model_copy(update={"objective": cfg.objective.model_copy(
        update={"dtype": resolve_dtype(cfg.objective.dtype, options.device)})})
    out_p = Path(out).expanduser().absolute()
    run_key = {"config": cfg.model_dump(mode="json"), "strategy": cfg.strategy}
    work, resumed = _prepare_work(out_p, run_key, resume=resume, force=options.force,
                                  inputs=optimize_inputs(cfg, config))
    run = _Run(cfg, work, out_p, resumed=resumed, options=options, save_model=save_model, evaluate=evaluate)
    try:
        return run.execute(ray, on_generation)
    except Exception:
        # an error (not an interruption) leaves nothing behind: a fresh run's work directory goes,
        # a resumed run's checkpoint stays for the next --resume
        if not resumed:
            shutil.rmtree(work, ignore_errors=True)
        raise


@dataclass
class _Run:
    """One optimize run assembled in ``work``: the backend, the search, the summary, the model, the promotion."""

    cfg: OptimizeConfig
    work: Path
    out: Path
    resumed: bool
    options: RunOptions
    save_model: bool
    evaluate: Callable[[Path, Path], dict[str, Any]] | None

    def execute(self, ray: RayPool | None, on_generation: Callable[[int, int], None] | None) -> dict[str, Any]:
        """The search, the report and the merged model, assembled in ``work`` and promoted to ``out``."""

        trace = Trace(self.work / "trace.jsonl")
        t_setup = time.perf_counter()
        genome, backend, (n_safety, n_expert) = self._backend(ray)
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        try:
            res, best_cfg, extra = self._search(genome, backend, trace, on_generation)
        finally:
            backend.close()
        search_s = time.perf_counter() - t0

        (self.work / "best.yml").write_text(yaml.safe_dump(best_cfg, sort_keys=False), encoding="utf-8")
        rows = trace.read()
        summary = {**self._summary(genome, res, best_cfg, rows, n_safety, n_expert, use_ray=ray is not None),
                   "setup_seconds": round(setup_s, 3), "search_seconds_this_session": round(search_s, 3),
                   **_candidate_rates(rows), **extra}
        self._write_outputs(summary, best_cfg, rows, n_safety, n_expert)
        _finalize(self.work, self.out, force=self.options.force)
        return summary

    def _backend(self, ray: RayPool | None) -> tuple[Any, Any, tuple[int | None, int | None]]:
        """The genome, the candidate-scoring backend (serial or Ray) and the objective's data sizes."""

        cfg = self.cfg
        if ray is None:
            ev = CandidateEvaluator(cfg, options=self.options)
            return ev.genome, SerialBackend(ev), (ev.n_safety, ev.n_expert)

        anchor = cfg.genome.base_model or cfg.genome.models[0]
        genome = build_genome(cfg, open_checkpoint(anchor, options=self.options))
        r = cfg.ray
        backend = RayBackend(cfg.model_dump(mode="json"), workers=ray.workers or r.workers,
                             address=ray.address or r.address, cpus_per_worker=r.cpus_per_worker,
                             gpus_per_worker=r.gpus_per_worker, options=self.options)
        return genome, backend, (None, None)

    def _search(self, genome: Any, backend: Any, trace: Trace,
                on_generation: Callable[[int, int], None] | None) -> tuple[dict, dict, dict]:
        """Run the configured strategy: its result, the best merge config and the strategy's summary fields."""
        if self.cfg.strategy == "evomm":
            return self._search_evomm(genome, backend, trace, on_generation)
        trace.truncate(0)
        if self.cfg.strategy == "grid":
            return self._search_grid(genome, backend, trace)
        return self._search_cocktail(backend, trace)

    def _search_evomm(self, genome: Any, backend: Any, trace: Trace,
                      on_generation: Callable[[int, int], None] | None) -> tuple[dict, dict, dict]:

        cma = self.cfg.cma
        pop = cma.popsize or default_popsize(max(2, len(genome)))
        total = max(1, -(-cma.max_evals // pop)) * pop
        with progress_bar("optimize (CMA-ES)", total=total, enabled=self.options.progress, unit="candidates") as bar:
            done = [0]

            def _tick(evals: int, _total: int) -> None:
                bar.advance(n=evals - done[0])
                done[0] = evals

            res = run_evomm(genome, backend, cma, self.work, trace, resume=self.resumed,
                            on_generation=on_generation, progress=_tick)
        extra = {"generations": res["generations"], "popsize": res["popsize"], "final_sigma": res["sigma"]}
        return res, genome.to_config(res["x"]), extra

    def _search_grid(self, genome: Any, backend: Any, trace: Trace) -> tuple[dict, dict, dict]:
        total = len(grid_points(genome, self.cfg.grid))
        with progress_bar("optimize (grid)", total=total, enabled=self.options.progress, unit="candidates") as bar:
            res = run_grid(genome, backend, self.cfg.grid, trace, progress=lambda i, n: bar.advance(n=1))
        return res, genome.to_config(res["x"]), {"grid_point": res["point"]}

    def _search_cocktail(self, backend: Any, trace: Trace) -> tuple[dict, dict, dict]:
        cfg = self.cfg
        pool = list(dict.fromkeys(cfg.genome.models))
        res = run_cocktail(pool, backend, cfg.cocktail.temperature, trace)
        best_cfg = cocktail_config(pool, res["weights"], dtype=cfg.genome.dtype,
                                   tokenizer_source=cfg.genome.tokenizer_source)
        res["loss"] = None
        extra = {"model_losses": dict(zip(pool, res["losses"])), "weights": dict(zip(pool, res["weights"])),
                 "temperature": cfg.cocktail.temperature}
        return res, best_cfg, extra

    def _summary(self, genome: Any, res: dict[str, Any], best_cfg: dict[str, Any], rows: list[dict[str, Any]],
                 n_safety: int | None, n_expert: int | None, *, use_ray: bool) -> dict[str, Any]:
        """The run's ``summary.json`` fields that describe the search and its best candidate."""
        cfg = self.cfg
        cocktail = cfg.strategy == "cocktail"
        return {
            "strategy": cfg.strategy,
            "merge_method": best_cfg["merge_method"] if cocktail else cfg.genome.merge_method,
            "genes": len(cfg.genome.models) if cocktail else len(genome),
            "evaluations": len(rows),
            "best_loss": res.get("loss"),
            "best_eval": res.get("eval"),
            "n_safety": n_safety,
            "n_expert": n_expert,
            "alpha": cfg.objective.alpha,
            "objective_dtype": cfg.objective.dtype,
            "safety_tokens": cfg.objective.safety_tokens,
            "resumed": self.resumed,
            "ray": use_ray,
        }

    def _write_outputs(self, summary: dict[str, Any], best_cfg: dict[str, Any], rows: list[dict[str, Any]],
                       n_safety: int | None, n_expert: int | None) -> None:
        """The trace plot, the merged model (and its evaluation), ``summary.json`` and ``report.md``."""

        work = self.work
        if rows:
            report.plot_trace(rows, work / "trace.png", title=f"{self.cfg.strategy} ({summary['merge_method']})")
        (work / "cma_state.pkl").unlink(missing_ok=True)
        if self.save_model:
            self._merge_best(best_cfg)
            if self.evaluate is not None:
                shutil.rmtree(work / "eval", ignore_errors=True)
                evaluation = self.evaluate(work / "model", work / "eval")
                summary["evaluation"] = report.row_from_eval(
                    report.method_label(self.cfg.strategy, summary["merge_method"]),
                    report.data_label(n_safety, n_expert), evaluation)
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (work / "report.md").write_text(report.run_report_markdown(summary, best_cfg), encoding="utf-8")

    def _merge_best(self, best_cfg: dict[str, Any]) -> None:
        """``model/``: the best config merged with the config's seed, one engine thread."""

        if (self.work / "model").exists():  # a previous attempt died while merging or evaluating
            shutil.rmtree(self.work / "model")
        merge(best_cfg, self.work / "model", options=RunOptions(
            seed=self.cfg.seed, device=self.options.device, allow_pickle=self.options.allow_pickle,
            allow_nonfinite=self.options.allow_nonfinite, progress=self.options.progress, threads=1))


def _candidate_rates(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Seconds per candidate and candidates per hour, from the trace's merge and scoring times."""
    per_cand = [float(r.get("merge_s", 0)) + float(r.get("score_s", 0)) for r in rows]
    total = sum(per_cand)
    return {"seconds_per_candidate": round(total / len(per_cand), 4) if per_cand else None,
            "candidates_per_hour": round(3600 * len(per_cand) / total, 1) if per_cand and total > 0 else None}
