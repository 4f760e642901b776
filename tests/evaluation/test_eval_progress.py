"""The progress display on the tiny fixtures: phase label, counts and rate when drawn on a
terminal; nothing when piped or with --quiet; one display shared by nested phases."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.evaluation.runner import EvalConfig, evaluate
from emomerge.merging import merge
from emomerge.merging.progress import ENV, display, phase, wanted
from emomerge.training.data import read_dataset


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=200, color_system=None), buf


def _plain(buf: io.StringIO) -> str:
    """The drawn lines: escape sequences dropped, each redraw (after a \\r) on its own line."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n")


@pytest.fixture(scope="module")
def emoart_test(emoart_dir):
    return read_dataset("emoart", emoart_dir, "test")


def test_evaluate_draws_phase_counts_and_rate(host, tiny_base, stage_dirs, emoart_test, tmp_path):
    from emomerge.evaluation.variants import discover

    (s1,) = discover([stage_dirs[0]])
    cfg = EvalConfig(dataset="emoart", split="test", n_boot=10, seed=0)
    console, buf = _terminal()
    with display(True, console=console):
        evaluate(
            host,
            tiny_base,
            [s1],
            emoart_test,
            tmp_path / "on",
            cfg,
            include_base=False,
            progress=True,
        )
    text = _plain(buf)
    n = len(emoart_test)
    # the bar's last draw: the whole split done, its rate, the elapsed time after "ETA"
    line = next(
        ln
        for ln in text.splitlines()
        if "score s1_emoart on emoart/test" in ln and f"{n}/{n}" in ln
    )
    rate = float(re.search(r"(\d+\.\d\d) examples/s", line).group(1))
    assert rate > 0
    assert re.search(r"ETA \d:\d\d:\d\d", line)

    console, buf = _terminal()  # the library switch: progress=False draws nothing
    with display(True, console=console):
        evaluate(
            host,
            tiny_base,
            [s1],
            emoart_test,
            tmp_path / "off",
            cfg,
            include_base=False,
            progress=False,
        )
    assert "score" not in _plain(buf) and "examples/s" not in _plain(buf)


def test_merge_draws_its_phase_in_modules(stage_dirs, tmp_path):
    console, buf = _terminal()
    with display(True, console=console):
        res = merge(
            "ties", stage_dirs, tmp_path / "ties", params={"density": 0.5}, rank=4, progress=True
        )
    n = res.manifest["n_modules"]
    line = next(ln for ln in _plain(buf).splitlines() if "merge ties" in ln and f"{n}/{n}" in ln)
    assert re.search(r"\d+\.\d\d modules/s", line)


def test_nested_phases_share_one_display_and_leave_nothing():
    console, buf = _terminal()
    with display(True, console=console) as progress:
        with phase("outer", 2, unit="steps") as outer:
            with phase("inner", 3) as inner:
                assert [t.description for t in progress.tasks] == ["outer", "inner"]
                inner.advance(3)
            outer.advance(1)
            assert [(t.description, t.completed) for t in progress.tasks] == [("outer", 1)]
        assert progress.tasks == []
    assert "inner" in _plain(buf) and "3/3" in _plain(buf)


def test_disabled_or_not_a_terminal_draws_nothing():
    console, buf = _terminal()
    with display(True, console=console), phase("hidden", 4, enabled=False) as bar:
        bar.advance(4)
    assert "hidden" not in _plain(buf)
    piped = io.StringIO()
    with display(True, console=Console(file=piped)) as progress:
        assert progress is None  # no live display behind a pipe
        with phase("piped", 1) as bar:
            bar.advance(1)
    assert piped.getvalue() == ""


def test_wanted_terminal_flags_and_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert wanted() and wanted(True)
    assert not wanted(quiet=True) and not wanted(False)
    monkeypatch.setenv(ENV, "0")
    assert not wanted(True)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.setenv(ENV, "1")
    assert wanted() and not wanted(quiet=True)
    monkeypatch.delenv(ENV)
    assert not wanted(True)


def _evaluate(tiny_base, stage_dirs, emoart_dir, out, *extra):
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            str(stage_dirs[0]),
            "--no-base",
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--split",
            "test",
            "--out",
            str(out),
            "--n-boot",
            "10",
            *extra,
        ],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    return res


def test_cli_evaluate_progress_forced_piped_and_quiet(
    tiny_base, stage_dirs, emoart_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(ENV, "1")  # stands in for a terminal on stderr
    monkeypatch.setenv("COLUMNS", "200")  # a wide one: every column drawn in full
    forced = _evaluate(tiny_base, stage_dirs, emoart_dir, tmp_path / "forced")
    assert "\x1b[" in forced.stderr  # drawn as on a terminal
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", forced.stderr)
    assert "score s1_emoart on emoart/test" in drawn
    assert re.search(r"(\d+)/\1 \d+\.\d\d examples/s ETA", drawn)  # all done, with its rate
    assert "examples/s" not in forced.stdout  # stdout keeps only the rows and the table
    quiet = _evaluate(tiny_base, stage_dirs, emoart_dir, tmp_path / "quiet", "--quiet")
    assert "examples/s" not in quiet.output and "score s1_emoart" not in quiet.output
    monkeypatch.delenv(ENV)  # CliRunner's stderr is no terminal: piped
    piped = _evaluate(tiny_base, stage_dirs, emoart_dir, tmp_path / "piped")
    assert "examples/s" not in piped.output and "score s1_emoart" not in piped.output
    # the three runs scored the same rows
    assert quiet.stdout.splitlines()[1:] == piped.stdout.splitlines()[1:]
    assert forced.stdout.splitlines()[1:] == piped.stdout.splitlines()[1:]


def test_cli_merge_progress_forced_and_quiet(stage_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    args = [
        "ties",
        "--adapters",
        str(stage_dirs[0]),
        "--adapters",
        str(stage_dirs[1]),
        "--density",
        "0.5",
        "--rank",
        "4",
    ]
    drawn = runner.invoke(app, [*args, "--out", str(tmp_path / "on")])
    assert drawn.exit_code == 0, drawn.output
    assert re.search(
        r"merge ties .*(\d+)/\1 \d+\.\d\d modules/s",
        re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.stderr),
    )
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "quiet"), "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "modules/s" not in quiet.output and "merge ties" not in quiet.output
    assert (tmp_path / "quiet" / "adapter_model.safetensors").is_file()
