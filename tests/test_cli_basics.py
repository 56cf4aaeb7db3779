"""The CLI frame: --version, --help on every command, usage errors → one line + exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from safemerge import __version__


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, timeout=120)


def _commands() -> list[list[str]]:
    import typer

    from safemerge.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        if sub:
            out += [[name, s] for s in sub]
        out.append([name])
    return out


def test_version() -> None:
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"safemerge {__version__}"


def test_help_on_every_command(capsys) -> None:
    from safemerge.cli import main

    cmds = _commands()
    assert {"merge", "convert", "scan", "safemerge", "safelora", "resta", "eval", "compare", "train-lora", "synth",
            "optimize", "demo"} <= {c[0] for c in cmds}
    for cmd in cmds:
        code = 0
        try:
            main([*cmd, "--help"])
        except SystemExit as exc:
            code = exc.code
        assert code in (0, None), cmd
        out = capsys.readouterr().out
        assert "Usage:" in out and len(out.splitlines()) > 3, cmd


def test_help_does_not_import_torch() -> None:
    code = "import sys; from safemerge.cli import app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False False", r.stdout + r.stderr


@pytest.mark.parametrize("argv,phrase", [(["nosuch"], "no such command"), (["merge"], "missing argument"),
                                         (["merge", "a.yml", "out", "-j", "0"], "--jobs")])
def test_usage_errors(argv: list[str], phrase: str) -> None:
    r = _run(*argv)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and phrase in r.stderr.lower()
    assert len(r.stderr.strip().splitlines()) <= 3


def test_no_arguments_prints_help() -> None:
    r = _run()
    assert r.returncode == 0 and "Usage:" in r.stdout
