"""Parallel candidate evaluation on Ray actors (``--ray`` / ``--ray-address``).

Each actor builds its own :class:`~safemerge.optimize.candidate.CandidateEvaluator` (opened
checkpoints, one resident model, the tokenised sample) once, then scores the candidates it is
sent — mergekit-evolve's "pool" strategy with in-memory merging. Results come back in submission
order, and every candidate's score is a deterministic function of its genes, so a Ray run
produces the same trace as a serial one. Ray is imported only when this backend is used.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.optimize.candidate import CandidateEvaluator
from safemerge.optimize.config import load_optimize_config
from safemerge.options import RunOptions


class RayBackend:
    """A pool of evaluator actors.

    Args:
        cfg_dict: the optimize config as a plain dict (sent to the actors).
        workers: number of actors.
        address: a running cluster's address (``None`` = start a local Ray instance).
        cpus_per_worker, gpus_per_worker: resources reserved per actor (one GPU each on GPU nodes).
        options: the run's options, passed to each evaluator (``device``, ``allow_pickle``, ``trust_remote_code``).
    """

    def __init__(self, cfg_dict: dict[str, Any], *, workers: int = 2, address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 options: RunOptions | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SafemergeError("--ray needs the 'ray' package", "pip install 'safemerge[ray]'") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                kw["address"] = address
            else:
                kw["num_cpus"] = max(1, int(round(workers * cpus_per_worker)))
                if gpus_per_worker:
                    kw["num_gpus"] = int(round(workers * gpus_per_worker + 0.4999))
            try:
                ray.init(**kw)
            except ConnectionError as exc:
                raise SafemergeError(f"cannot connect to the Ray cluster at {address!r} ({exc})",
                                     "check --ray-address, or drop it to start a local Ray instance") from exc
            self._started = True

        @ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        class _Worker:
            def __init__(self, cfg: dict[str, Any], options: RunOptions | None, threads: int) -> None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")

                self.ev = CandidateEvaluator(load_optimize_config(cfg), options=options, num_threads=threads)

            def score_vector(self, x: list[float]) -> dict[str, Any]:
                return self.ev.score_vector(x)

            def score_model(self, ref: str) -> dict[str, Any]:
                return self.ev.score_model(ref)

        threads = max(1, int(cpus_per_worker))
        self.actors = [_Worker.remote(cfg_dict, options, threads) for _ in range(workers)]

    def _map(self, method: str, items: Sequence[Any]) -> list[dict[str, Any]]:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        fn = {"vector": lambda a, v: a.score_vector.remote(v), "model": lambda a, v: a.score_model.remote(v)}[method]
        try:
            return list(pool.map(fn, list(items)))
        except self.ray.exceptions.RayActorError as exc:
            raise SafemergeError(f"a Ray worker died ({' '.join(str(exc).split())[:200]})",
                                 "check the worker's memory; lower ray.workers") from exc
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SafemergeError):
                raise cause from None
            raise

    def score_vectors(self, xs: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        return self._map("vector", [[float(v) for v in x] for x in xs])

    def score_models(self, refs: Sequence[str]) -> list[dict[str, Any]]:
        return self._map("model", list(refs))

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self._started:
            self.ray.shutdown()
