"""One progress-bar builder (``safemerge.progress.progress_bar``): the generation bar, the safety commands'
per-stage bars and the training bar all come from it (issue 12, habits)."""
from __future__ import annotations

from pathlib import Path

import safemerge
from safemerge.progress import progress_bar


def test_no_module_builds_its_own_rich_bar() -> None:
    src = Path(safemerge.__file__).parent
    builders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                      if p.name != "progress.py" and "rich.progress" in p.read_text(encoding="utf-8"))
    assert builders == []


def test_stages_get_one_line_each_and_transient_bars_clear() -> None:
    with progress_bar("", total=None, enabled=True, unit="", transient=True) as bar:
        bar.stage("scan", 1, 4)
        bar.stage("scan", 4, 4)
        bar.stage("merge", 2, 3)
        tasks = {t.description: (t.completed, t.total) for t in bar._p.tasks}
        assert bar._p.live.transient
    assert tasks == {"scan": (4, 4), "merge": (2, 3)}


def test_a_counted_bar_advances_by_n_and_a_disabled_bar_is_silent() -> None:
    with progress_bar("generating", total=5, enabled=True, unit="prompts") as bar:
        bar.advance(n=2)
        bar.advance(n=3)
        (task,) = bar._p.tasks
        assert (task.description, task.completed, task.total) == ("generating", 5, 5)
        assert not bar._p.live.transient
    with progress_bar("quiet", total=3, enabled=False) as off:
        off.advance(n=3)
        off.stage("scan", 1, 2)  # no-op
        assert off._p is None


def test_safety_commands_progress_callback_uses_the_builder(monkeypatch) -> None:
    import safemerge.progress as P
    from safemerge.cli.safety_cmd import progress_callback

    seen = {}
    real = P.progress_bar

    def spy(description, **kw):
        seen.update(kw)
        return real(description, **kw)

    monkeypatch.setattr(P, "progress_bar", spy)
    with progress_callback(True) as cb:
        cb("merge", 1, 2)
    assert seen["total"] is None and seen["transient"] is True and seen["enabled"] is True


def test_a_log_file_gets_progress_lines_while_the_work_runs(monkeypatch, capsys) -> None:
    """stderr is captured here, not a terminal: rich would print the bar only at the end, so the bar logs its
    state as plain lines while it runs (every LOG_INTERVAL_S seconds; 0 here)."""
    import safemerge.progress as P

    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    with progress_bar("train-lora", total=4, enabled=True, unit="steps", fields=("loss",)) as bar:
        capsys.readouterr()
        bar.advance(n=1, loss="2.500")
        first = capsys.readouterr().err
        bar.advance(n=1, loss="2.100")
        second = capsys.readouterr().err
    assert "train-lora" in first and "1/4" in first and "loss 2.500" in first
    assert "2/4" in second and "loss 2.100" in second


def test_a_log_file_is_not_flooded(monkeypatch, capsys) -> None:
    import safemerge.progress as P

    monkeypatch.setattr(P, "LOG_INTERVAL_S", 3600.0)
    with progress_bar("generating", total=100, enabled=True, unit="prompts") as bar:
        capsys.readouterr()
        for _ in range(100):
            bar.advance()
        during = capsys.readouterr().err
    assert during == ""
