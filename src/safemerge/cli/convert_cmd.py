"""``safemerge convert``: import a GGUF model file as a plain safetensors Hugging Face directory."""
from __future__ import annotations

from pathlib import Path

import typer

from safemerge.cli import app
from safemerge.cli.options import force_option


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
) -> None:
    """Convert GGUF_FILE into the Hugging Face model directory OUT."""
    import time

    from rich.console import Console

    from safemerge.io.gguf import convert_gguf

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status(f"converting {gguf_file.name}") as status:
        path = convert_gguf(gguf_file, out, dtype=dtype, force=force, on_step=lambda msg: status.update(f"{msg}…"))
    console.print(f"wrote {path} ({dtype}) in {time.perf_counter() - start:.1f} s")
