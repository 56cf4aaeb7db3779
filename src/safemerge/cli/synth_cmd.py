"""``safemerge synth safety|domain``: synthetic D_safety / D_expert (Hammoud et al. 2024, §4.2–4.3)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from safemerge.cli import app
from safemerge.cli.options import (
    allow_pickle_option,
    echo_summary,
    force_option,
    generation_batch_size_option,
    generation_dtype_option,
    no_progress_option,
    out_option,
    output_alias_option,
    pick_out,
    quiet_option,
    run_options,
    trust_remote_code_option,
)

synth_app = typer.Typer(
    name="synth",
    help="Generate synthetic safety (refusal) and domain (self-questioning) data for safety-aware merging.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(synth_app, name="synth")


# generation options shared by `synth safety` and `synth domain`
def _max_new_tokens_option() -> Any:
    return typer.Option(512, "--max-new-tokens", min=1, help="Token budget of questions and answers (paper: 512).")


def _backend_option() -> Any:
    return typer.Option("auto", "--backend", help="Generation backend: auto, hf or vllm.")


def _print_stats(title: str, stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=True)
    t.add_column("step")
    t.add_column("count", justify="right")
    for k, v in stats.items():
        t.add_row(k, ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else str(v))
    Console(stderr=True).print(t)


def _labels(paths: list[str]) -> dict[str, str]:
    from safemerge.synth.common import model_label

    out: dict[str, str] = {}
    for p in paths:
        name = model_label(p)
        while name in out:
            name += "'"
        out[name] = p
    return out


@synth_app.command("safety", no_args_is_help=True)
def safety_cmd(
    pool: list[str] = typer.Option(..., "--pool", "-m",
                                   help="A model of the merge pool (path, Hub id or MODEL+ADAPTER; repeat for each); "
                                        "every one answers every question."),
    out: Optional[Path] = out_option("Output JSONL file: {prompt, response, type: safety, category, source_model}."),
    output: Optional[Path] = output_alias_option(),
    generator: Optional[str] = typer.Option(None, "--generator", "-g",
                                            help="Model that writes unsafe questions as JSON (an uncensored model in "
                                                 "the paper)."),
    prompts: Optional[str] = typer.Option(None, "--prompts",
                                          help="Use an existing prompt set (file or evaluation-harness name) instead "
                                               "of --generator."),
    num: int = typer.Option(100, "--num", "-n", min=1,
                            help="Number of questions to generate (or to take from --prompts)."),
    categories: Optional[list[str]] = typer.Option(None, "--category", "-c",
                                                   help="Harm category name or number 1-14 (repeatable; default all "
                                                        "14)."),
    judge: str = typer.Option("keyword", "--judge", help="Judge of the answers: 'keyword' or 'llamaguard:PATH'."),
    require_refusal: bool = typer.Option(False, "--require-refusal",
                                         help="Keep only answers the judge marks as explicit refusals, not merely "
                                              "safe."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random refusal choice (and prompt sampling)."),
    max_new_tokens: int = _max_new_tokens_option(),
    batch_size: Optional[int] = generation_batch_size_option(),
    backend: str = _backend_option(),
    dtype: Optional[str] = generation_dtype_option(),
    force: bool = force_option("Replace an existing output file."),
    allow_pickle: bool = allow_pickle_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Build D_safety: unsafe questions answered with refusals chosen among the pool's safe answers.

    Example: safemerge synth safety -g UNCENSORED -m ALIGNED -m EXPERT -n 200 --judge keyword -o d_safety.jsonl
    """
    import random
    import time

    from safemerge.errors import SafemergeError
    from safemerge.io.output import check_output_file
    from safemerge.progress import library_progress
    from safemerge.synth.categories import resolve_categories
    from safemerge.synth.common import load_generator, load_judge, load_questions, write_jsonl
    from safemerge.synth.safety import SafetyStats, build_safety_set, generate_unsafe_questions

    started, output = time.perf_counter(), pick_out(out, output)
    options = run_options(quiet=quiet, no_progress=no_progress, seed=seed, force=force, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    library_progress(options.progress)
    if (generator is None) == (prompts is None):
        raise SafemergeError("give exactly one of --generator and --prompts",
                             "--generator MODEL writes questions; --prompts SET reuses a prompt set")
    check_output_file(output, force=force, inputs=(*pool, generator, prompts))
    cats = resolve_categories(categories)
    the_judge = load_judge(judge)  # an unknown judge fails before any model is loaded
    stats = SafetyStats()
    if prompts is not None:
        qs = load_questions(prompts)
        if not qs:
            raise SafemergeError(f"prompt set {prompts!r} has no questions", "check the file or set name")
        if len(qs) > num:
            idx = sorted(random.Random(options.seed).sample(range(len(qs)), num))
            qs = [qs[i] for i in idx]
    else:
        gen = load_generator(generator, backend=backend, dtype=dtype, options=options)
        qs = generate_unsafe_questions(gen, num, categories=cats, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       stats=stats, options=options)
        del gen
        if not qs:
            raise SafemergeError("the generator produced no parsable questions",
                                 "use a stronger instruction-following generator, or --prompts")
    gens = {name: load_generator(p, backend=backend, dtype=dtype, options=options) for name, p in _labels(pool).items()}
    records = build_safety_set(qs, gens, the_judge, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               require_refusal=require_refusal, stats=stats, options=options)
    if not quiet:
        _print_stats("synth safety", stats.as_dict())
    if not records:
        raise SafemergeError("no model of the pool refused any question; nothing to write",
                             "add an aligned model to --pool")
    write_jsonl(output, records, force=force)
    echo_summary(output, started, detail=f"{len(records)} safety records")


@synth_app.command("domain", no_args_is_help=True)
def domain_cmd(
    model: list[str] = typer.Option(..., "--model", "-m",
                                    help="A domain expert (path, Hub id or MODEL+ADAPTER; repeat for each); it writes "
                                         "and answers its own questions."),
    seed_file: str = typer.Option(..., "--seed-file",
                                  help="Questions to draw the 3 in-context examples from (JSON/JSONL/text, or a "
                                       "harness set name)."),
    topic: str = typer.Option(..., "--topic", help="Domain named in the prompt, e.g. 'biology', 'STEM', 'reasoning'."),
    out: Optional[Path] = out_option("Output JSONL file: {prompt, response, type: domain, category, source_model}."),
    output: Optional[Path] = output_alias_option(),
    num: int = typer.Option(100, "--num", "-n", min=1, help="Total number of questions (split evenly across experts)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the in-context example draws."),
    max_new_tokens: int = _max_new_tokens_option(),
    structured: bool = typer.Option(
        False, "--structured",
        help="Few-shot 'Question: … / Answer: <number>' format for small experts: seed records need an 'answer'; "
             "a question is kept only if the expert's second decode (its chat answer) gives the same number."),
    answer_instruction: str = typer.Option(
        "", "--answer-instruction",
        help="With --structured: text appended to each kept question before the expert answers it "
             "(e.g. \"Answer with the final number after 'The answer is'.\")."),
    batch_size: Optional[int] = generation_batch_size_option(),
    backend: str = _backend_option(),
    dtype: Optional[str] = generation_dtype_option(),
    force: bool = force_option("Replace an existing output file."),
    allow_pickle: bool = allow_pickle_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Build D_expert: each expert writes exam-style questions from 3 random seed examples, then answers them.

    Example: safemerge synth domain -m EXPERT --seed-file val_questions.jsonl --topic biology -n 200 -o d_expert.jsonl
    Small experts: safemerge synth domain -m EXPERT --seed-file train.jsonl --topic arithmetic --structured -o d.jsonl
    """
    import time

    from safemerge.errors import SafemergeError
    from safemerge.io.output import check_output_file
    from safemerge.progress import library_progress
    from safemerge.synth.common import load_generator, load_questions, write_jsonl
    from safemerge.synth.domain import DomainStats, build_domain_set

    started, output = time.perf_counter(), pick_out(out, output)
    options = run_options(quiet=quiet, no_progress=no_progress, seed=seed, force=force, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    library_progress(options.progress)
    check_output_file(output, force=force, inputs=(*model, seed_file))
    if structured:
        from safemerge.synth.common import read_records
        from safemerge.synth.structured import seed_problems_from_records

        if not Path(seed_file).expanduser().is_file():
            raise SafemergeError(f"--structured needs a seed file, {seed_file!r} is not one",
                                 "give a JSON/JSONL file of records with a question and an 'answer'")
        problems = seed_problems_from_records(read_records(seed_file))
    else:
        seeds = [q["prompt"] for q in load_questions(seed_file)]
    gens = {name: load_generator(p, backend=backend, dtype=dtype, options=options)
            for name, p in _labels(model).items()}
    if structured:
        from safemerge.synth.structured import StructuredStats, build_structured_domain_set

        stats: Any = StructuredStats()
        records = build_structured_domain_set(gens, problems, topic, num, answer_tokens=max_new_tokens,
                                              answer_instruction=answer_instruction, batch_size=batch_size,
                                              stats=stats, options=options)
    else:
        stats = DomainStats()
        records = build_domain_set(gens, seeds, topic, num, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, stats=stats, options=options)
    if not quiet:
        _print_stats("synth domain", stats.as_dict())
    if not records:
        raise SafemergeError("the experts produced no parsable, new, answer-checked questions",
                             "use instruction-following experts, try --structured, or raise --num")
    write_jsonl(output, records, force=force)
    echo_summary(output, started, detail=f"{len(records)} domain records")
