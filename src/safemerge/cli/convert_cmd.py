"""``safemerge convert``: import a GGUF model file as a plain safetensors Hugging Face directory."""
from __future__ import annotations

from pathlib import Path

import typer

from safemerge.cli import app
from safemerge.cli.options import echo_summary, force_option, no_progress_option, quiet_option, run_options

# stages reported by convert_gguf's on_step: de-quantise, tokenizer, write
_STAGES = 3


@app.command(
    "convert",
    help=(
        "Convert a GGUF model (llama.cpp, any quantisation transformers can read) into a plain "
        "safetensors Hugging Face directory: config without quantisation, tokenizer with chat "
        "template, generation_config. Example: safemerge convert SmolLM2-135M-Instruct.Q4_1.gguf base/"
    ),
    no_args_is_help=True,
)
def convert(
    gguf_file: Path = typer.Argument(..., help="The .gguf model file to import.", show_default=False),
    out: Path = typer.Argument(..., help="Output directory (written atomically).", show_default=False),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32, bfloat16 or float16."),
    force: bool = force_option(),
    no_progress: bool = no_progress_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Convert GGUF_FILE into the Hugging Face model directory OUT."""
    import time

    from safemerge.io.gguf import convert_gguf, read_gguf_metadata
    from safemerge.io.output import check_output_path
    from safemerge.progress import progress_bar

    started = time.perf_counter()
    options = run_options(quiet=quiet, no_progress=no_progress, dtype=dtype, force=force)
    # output and input errors are reported before the bar appears (the output check first: it reads nothing)
    check_output_path(out, force=force, inputs=(gguf_file,))
    read_gguf_metadata(gguf_file)
    with progress_bar("convert", total=_STAGES, unit="stages", enabled=options.progress) as bar:
        stage = [0]

        def on_step(message: str) -> None:
            """Show the stage that starts now; the bar counts the stages already finished."""
            bar.update(completed=stage[0], description=message)
            stage[0] += 1

        path = convert_gguf(gguf_file, out, options=options, on_step=on_step)
        bar.update(completed=_STAGES, description="convert")
    echo_summary(path, started, detail=dtype)
