"""The ``safemerge`` command line: a thin layer over the Python API.

Each command lives in its own module (``cli/<name>_cmd.py``) that registers on :data:`app`.
Command modules import only typer at module level and import torch lazily inside the
command body, so ``safemerge --help`` stays fast. Errors are handled in :func:`main`:
:class:`~safemerge.errors.SafemergeError` → one line on stderr and exit status 2.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer

from safemerge import __version__

app = typer.Typer(
    name="safemerge",
    help="Merge and fine-tune LLMs without losing their safety alignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}

# Command modules, registered in this order (each one adds its commands to ``app``).
COMMAND_MODULES = [
    "safemerge.cli.eval_cmd",
    "safemerge.cli.convert_cmd",
    "safemerge.cli.train_cmd",
    "safemerge.cli.safety_lora_cmd",
    "safemerge.cli.merge_cmd",
    "safemerge.cli.safety_cmd",
    "safemerge.cli.repair_cmd",
    "safemerge.cli.synth_cmd",
    "safemerge.cli.optimize_cmd",
    "safemerge.cli.methods_cmd",
    "safemerge.cli.demo_cmd",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safemerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Merge and fine-tune LLMs without losing their safety alignment."""
    _STATE["debug"] = debug or os.environ.get("SAFEMERGE_DEBUG") == "1"


for _mod in COMMAND_MODULES:
    importlib.import_module(_mod)


def _fail(message: str, hint: str | None, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _click_modules() -> list:
    """click exception namespaces in use: typer >= 0.20 vendors click as ``typer._click``."""
    mods = []
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]

        mods.append(vendored)
    except ImportError:
        pass
    try:
        from click import exceptions as upstream

        mods.append(upstream)
    except ImportError:
        pass
    return mods


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Turns user errors into one-line messages and exit code 2."""
    from safemerge.errors import SafemergeError, cli_invocation

    mods = _click_modules()
    exit_types = tuple({typer.Exit, *(getattr(m, "Exit") for m in mods if hasattr(m, "Exit"))})
    abort_types = tuple({typer.Abort, *(getattr(m, "Abort") for m in mods if hasattr(m, "Abort"))})
    click_types = tuple(getattr(m, "ClickException") for m in mods if hasattr(m, "ClickException"))
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("SAFEMERGE_DEBUG") == "1"
    try:
        with cli_invocation():  # hints name flags (--force), not keyword arguments (force=True)
            rv = app(args=argv, standalone_mode=False, prog_name="safemerge")
        if isinstance(rv, int) and rv:
            raise SystemExit(rv)
    except SafemergeError as exc:
        if debug:
            raise
        _fail(exc.message, exc.hint, exc.exit_code)
    except exit_types as exc:
        raise SystemExit(getattr(exc, "exit_code", 0))
    except abort_types:
        _fail("aborted", None, 130)
    except click_types as exc:
        _usage_error(exc, debug)
    except KeyboardInterrupt:
        _fail("interrupted; partial output was discarded", None, 130)
    except MemoryError:
        if debug:
            raise
        _fail("out of memory", "lower -j, use a smaller --out-shard-size or merge on a larger machine", 1)
    except Exception as exc:  # noqa: BLE001 - last-resort handler
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
              "rerun with --debug and report the traceback", 1)


def _usage_error(exc: Exception, debug: bool) -> None:
    """A command-line usage error (click's): its first line, and which ``--help`` to read; exit code 2.
    A command called without arguments prints its help instead (exit code 0)."""
    if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
        sys.stdout.write(exc.ctx.get_help() + "\n")  # type: ignore[attr-defined]
        raise SystemExit(0)
    if debug:
        raise exc
    message = exc.format_message()  # type: ignore[attr-defined]
    msg = message.splitlines()[0] if message else type(exc).__name__
    ctx = getattr(exc, "ctx", None)
    named = ctx is not None and ctx.info_name and ctx.info_name != "safemerge"
    cmd = f"safemerge {ctx.info_name} --help" if named else "safemerge --help"
    _fail(msg, f"run '{cmd}' for usage", 2)


def yaml_main() -> None:
    """``safemerge-yaml CONFIG OUT [flags]``: a drop-in for ``mergekit-yaml`` (same arguments and
    flags), run as ``safemerge merge``. Named so that it does not shadow mergekit's own script
    when both packages are installed (docs/cli.md)."""
    main(["merge", *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    main()
