"""Typer options shared by several commands: one definition and one help text each.

Each helper returns a fresh ``typer.Option`` (typer reads its metadata per command), so a command
declares e.g. ``force: bool = force_option()`` and every command documents the flag the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from safemerge.options import RunOptions

PICKLE_HELP = "Allow .bin/.pt pickle inputs (loaded with weights_only=True); only for trusted files."


def force_option(help: str = "Replace OUT if it exists.") -> Any:
    """``--force``: replace an existing output (it is still written elsewhere first and renamed into place)."""
    return typer.Option(False, "--force", help=help)


def allow_pickle_option() -> Any:
    """``--allow-pickle``: accept pickle checkpoints; they are never accepted by default."""
    return typer.Option(False, "--allow-pickle", help=PICKLE_HELP)


def allow_nonfinite_option() -> Any:
    """``--allow-nonfinite``: read weights holding NaN/Inf instead of refusing them."""
    return typer.Option(False, "--allow-nonfinite", help="Use inputs containing NaN/Inf instead of refusing them.")


def no_progress_option() -> Any:
    """``--no-progress``: no progress bars at all, the libraries' included (logs, CI)."""
    return typer.Option(False, "--no-progress",
                        help="Do not show progress bars (safemerge's, transformers' or Hub downloads').")


def quiet_option() -> Any:
    """``-q/--quiet``: the same in every command — no tables and no progress bars, only the final summary line."""
    return typer.Option(False, "-q", "--quiet", help="Print only the final summary line (no tables, no progress bars).")


def out_option(help: str) -> Any:
    """``-o/--out``: the output of every command."""
    return typer.Option(None, "-o", "--out", help=help, show_default=False)


def output_alias_option() -> Any:
    """``--output``: hidden alias of ``-o/--out`` kept for scripts written before the rename."""
    return typer.Option(None, "--output", hidden=True)


def run_options(*, quiet: bool = False, no_progress: bool = False, jobs: int | None = None, seed: int = 0,
                device: str = "cpu", dtype: str | None = None, force: bool = False, allow_pickle: bool = False,
                allow_nonfinite: bool = False, trust_remote_code: bool = False) -> RunOptions:
    """The command's :class:`~safemerge.options.RunOptions`, built once from its shared flags and passed down.

    Every command that runs a job calls this with the flags it declares (the rest keep their safe
    defaults); ``-q/--quiet`` and ``--no-progress`` both turn the progress bars off, ``-j`` is ``threads``.
    """
    from safemerge.options import RunOptions

    return RunOptions(allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, trust_remote_code=trust_remote_code,
                      force=force, dtype=dtype, device=device, seed=seed, threads=jobs,
                      progress=not (quiet or no_progress))


def pick_out(out: Path | None, output: Path | None) -> Path:
    """The output path given as ``-o/--out`` or as the hidden ``--output`` alias (exactly one)."""
    from safemerge.errors import SafemergeError

    if out is not None and output is not None and out != output:
        raise SafemergeError("-o/--out and --output name different outputs", "give the output once, with -o/--out")
    if out is None and output is None:
        raise SafemergeError("missing option -o/--out", "name the output, e.g. -o OUT")
    return out if out is not None else output  # type: ignore[return-value]


def echo_summary(written: Any, started: float, *, detail: str = "") -> None:
    """Print the command's one summary line (what was written, its size, the time) on stderr."""
    from safemerge.progress import summary_line

    typer.echo(summary_line(written, started, detail=detail), err=True)


def dtype_option() -> Any:
    """``--dtype``: storage dtype of the output (arithmetic is always float32)."""
    return typer.Option(None, "--dtype", help="Output dtype: float32, float16 or bfloat16 (default: the inputs').")


def generation_dtype_option(flag: str = "--dtype") -> Any:
    """Generation compute dtype; the default is decided by :func:`safemerge.evaluate.generate.resolve_dtype`."""
    return typer.Option(None, flag, help="Generation dtype: float32 (exact) | bfloat16 | float16 (default: "
                                         "bfloat16 on CUDA and on CPUs with native bf16 — AVX512-BF16, AMX, ARM "
                                         "bf16 — else float32).")


def generation_batch_size_option() -> Any:
    """``--batch-size`` of generation; the default is sized from memory per batch."""
    return typer.Option(None, "--batch-size", min=1,
                        help="Generation batch size (default: from memory, at most 64 on CPU and 256 on GPU).")


def trust_remote_code_option() -> Any:
    """``--trust-remote-code``: never on by default."""
    return typer.Option(False, "--trust-remote-code",
                        help="Allow model code from the model directory (off by default).")


def eval_flag_option(help: str) -> Any:
    """``--eval``: evaluate the finished output before it is renamed into place."""
    return typer.Option(False, "--eval", help=help)


def eval_harmful_option() -> Any:
    return typer.Option("builtin:harmful", "--eval-harmful", help="Harmful prompt set for --eval.")


def eval_benign_option() -> Any:
    return typer.Option("builtin:benign", "--eval-benign", help="Benign look-alike set for --eval (over-refusal).")


def eval_utility_option() -> Any:
    return typer.Option(None, "--eval-utility", help="Utility set for --eval (e.g. builtin:arithmetic).")


def eval_judge_option() -> Any:
    return typer.Option("keyword", "--eval-judge", help="Judge for --eval (keyword, llamaguard:PATH, …).")


def eval_limit_option() -> Any:
    return typer.Option(None, "--eval-limit", help="Evaluate at most N prompts per set.")


def lm_eval_tasks_option(flag: str = "--lm-eval-tasks") -> Any:
    """``--lm-eval-tasks``: lm-evaluation-harness tasks run on the same model (optional extra ``lm-eval``)."""
    return typer.Option(None, flag, help="Comma-separated lm-evaluation-harness tasks run on the same model "
                        "(adapter applied); metrics go to results.json, the report and the model card. Needs "
                        "safemerge[lm-eval].")


def lm_eval_include_option(flag: str = "--lm-eval-include") -> Any:
    """``--lm-eval-include``: a directory of lm-eval task YAMLs (offline: tasks with local data files)."""
    return typer.Option(None, flag, help="Directory of lm-eval task YAML files (lm-eval's --include_path); offline, "
                        "tasks whose data are local files (dataset_path: json + data_files).")


@dataclass(frozen=True)
class EvalSets:
    """The ``--eval-*`` choices of one command, passed on to :func:`safemerge.evaluate.api.evaluate`."""

    harmful: str
    benign: str
    utility: str | None
    judge: str
    limit: int | None

    options: RunOptions | None = None
    """The evaluation's own options (progress bars, model loading); its bootstrap seed is not the command's."""
    lm_eval_tasks: str | None = None
    lm_eval_include: Path | None = None

    def evaluate(self, model: str | Path, out_dir: str | Path, *, adapter: str | None = None,
                 device: str | None = None) -> dict[str, Any]:
        """Run the evaluation harness on ``model`` (+ ``adapter``, generating on ``device``) with these sets;
        results go to ``out_dir``."""
        from safemerge.evaluate.api import ExtraMetrics, GenerationSettings, evaluate
        from safemerge.evaluate.records import PromptSets

        return evaluate(str(model), PromptSets(self.harmful, self.benign, self.utility), adapter=adapter,
                        judge=self.judge, limit=self.limit, out_dir=str(out_dir),
                        generation=GenerationSettings(device=device),
                        extra=ExtraMetrics(lm_eval_tasks=self.lm_eval_tasks, lm_eval_include=self.lm_eval_include),
                        options=self.options)
