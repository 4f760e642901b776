"""The first hour of a new user: every option explained, --version, errors that name the real
problem (an unknown dataset, a missing --root), per-method --help, --device auto, and other
libraries' warnings kept out of our output."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from emomerge import __version__
from emomerge.cli import app

REPO = Path(__file__).resolve().parents[1]


def _commands(cmd, path=()):
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))
    yield " ".join(path), cmd


def test_every_option_and_argument_of_every_command_has_help():
    missing = [
        f"{path}: {p.name}"
        for path, cmd in _commands(typer.main.get_command(app))
        for p in cmd.params
        if not getattr(p, "hidden", False) and not (getattr(p, "help", "") or "").strip()
    ]
    assert missing == []
    # and the walk did see the commands (a test that cannot fail is no test)
    paths = {path for path, _ in _commands(typer.main.get_command(app))}
    assert {"evaluate", "ties", "leaderboard plot", "data synthetic", "demo"} <= paths


def test_version_flag_and_command():
    for argv in (["--version"], ["version"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0 and r.stdout.strip() == __version__


def test_each_method_command_lists_only_its_own_parameters():
    def options(command: str) -> set[str]:
        cmd = typer.main.get_command(app).commands[command]
        return {o for p in cmd.params if not p.hidden for o in p.opts}

    assert {"--normalize", "--space", "--weights", "--out"} <= options("linear")
    assert not {
        "--density",
        "--gamma",
        "--epsilon",
        "--lambda",
        "--rescale",
        "--paper",
        "--fraction",
        "--common-space-fraction",
    } & options("linear")
    assert {"--density", "--lambda", "--rescale", "--paper"} <= options("ties")
    assert "--gamma" not in options("ties") and "--gamma" in options("breadcrumbs")
    assert {"--fraction"} == options("tsv") & {"--fraction", "--density", "--epsilon"}
    ties = typer.main.get_command(app).commands["ties"]
    density = next(p for p in ties.params if p.name == "density")
    assert "[method default 1.0, range (0, 1]]" in density.help
    # a method's --rescale help offers only the values it takes ('density' is DARE's alone)
    for name, takes_density in (("ties", False), ("breadcrumbs", False), ("dare-ties", True)):
        rescale = next(
            p for p in typer.main.get_command(app).commands[name].params if p.name == "rescale"
        )
        assert ("density" in rescale.help) is takes_density, (name, rescale.help)


def test_rendered_help_shows_each_methods_default_and_range():
    """rich renders the help; the bracketed suffix must survive it (not be read as markup)."""
    r = CliRunner().invoke(app, ["ties", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if "--density" in ln)
    assert "[method default 1.0, range (0, 1]]" in line


def test_unknown_dataset_is_named_with_the_closest_one(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--dataset",
            "emocomic35",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        (
            "error: --dataset: unknown dataset 'emocomic35' (did you mean 'emocomics35'? expected "
            "one of emid, emoart, emocomics35, mangavqa)"
        )
    ]
    assert not (tmp_path / "r").exists()
    r = CliRunner().invoke(app, ["data", "inspect", "EmoArt", str(tmp_path)])
    assert r.exit_code == 2 and "did you mean 'emoart'?" in r.output


def test_device_auto_is_the_default_and_a_wrong_device_is_one_line(tmp_path):
    import torch

    from emomerge._cli_common import resolve_device
    from emomerge.cli_eval import evaluate_cmd

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"
    import inspect

    assert inspect.signature(evaluate_cmd).parameters["device"].default.default == "auto"
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--dataset",
            "emoart",
            "--device",
            "gpu",
        ],
    )
    assert r.exit_code == 2 and r.output.startswith("error: --device: expected auto, cpu")


def test_merge_without_root_points_at_it(tmp_path, monkeypatch):
    from tests.merging.helpers import lm_modules, write_adapter

    shapes = lm_modules(layers=1, hidden=8, inter=12)
    for i, name in enumerate(("emoart", "emid")):
        write_adapter(tmp_path / "runs" / "demo" / "adapters" / name, shapes, seed=i, r=2)
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: adapters/emoart\n  - model: adapters/emid\n"
    )
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["merge", str(recipe), "--out", "m"])
    assert r.exit_code == 2
    assert "adapters/emoart: no such adapter folder" in r.output
    assert "pass --root runs/demo for the folder" in r.output
    assert not (tmp_path / "m").exists()
    r = CliRunner().invoke(app, ["merge", str(recipe), "--out", "m", "--root", "runs/demo"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("linear: 2 adapters")


def test_other_libraries_warnings_are_silenced_ours_are_not(monkeypatch):
    from emomerge._cli_common import quiet_third_party

    for var in (
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    ):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        for module in ("transformers.modeling_utils", "torch.nn.modules.module", "peft.tuners"):
            warnings.warn_explicit("`x` is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("ours", UserWarning, "f.py", 1, module="emomerge.merging.engine")
    assert [str(w.message) for w in seen] == ["ours"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_verbose_keeps_them(monkeypatch):
    calls = []
    monkeypatch.setattr("emomerge.cli.quiet_third_party", lambda: calls.append(1))
    CliRunner().invoke(app, ["--verbose", "methods", "--format", "csv"])
    assert calls == []
    CliRunner().invoke(app, ["methods", "--format", "csv"])
    assert calls == [1]
