"""Data-loss cases around --out: what --force replaces, one writer per --out, leftovers, full disks.

Every refusal is one line on stderr naming the path, exit code 2, the inputs untouched and
nothing (no temporary, no lock) left beside --out.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import atomic, engine
from emomerge.merging.adapters import sha256_file

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


def run(args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture()
def ab(tmp_path):
    write_adapter(tmp_path / "a", SHAPES, seed=1)
    write_adapter(tmp_path / "b", SHAPES, seed=2)
    return tmp_path


def merge_args(ab, out, *extra):
    return ["linear", "--adapters", ab / "a", ab / "b", "--out", out, *extra]


# -- what --force may replace ------------------------------------------------------------------
def test_force_never_replaces_an_input_adapter(ab):
    before = sha256_file(ab / "b" / "adapter_model.safetensors")
    r = run(merge_args(ab, ab / "b", "--force"))
    one_error_line(r, str(ab / "b"), "is the input")
    assert sha256_file(ab / "b" / "adapter_model.safetensors") == before
    assert leftovers(ab, "b") == []
    # the same folder reached by another spelling is still the input
    r = run(merge_args(ab, ab / "x" / ".." / "b", "--force"))
    one_error_line(r, "is the input")
    assert sha256_file(ab / "b" / "adapter_model.safetensors") == before


def test_force_never_replaces_a_folder_holding_an_input_or_writes_inside_one(tmp_path):
    write_adapter(tmp_path / "runs" / "a", SHAPES, seed=1)
    write_adapter(tmp_path / "runs" / "b", SHAPES, seed=2)
    r = run(
        [
            "linear",
            "--adapters",
            tmp_path / "runs" / "a",
            tmp_path / "runs" / "b",
            "--out",
            tmp_path / "runs",
            "--force",
        ]
    )
    one_error_line(r, "contains the input")
    assert (tmp_path / "runs" / "a" / "adapter_model.safetensors").is_file()
    r = run(
        [
            "linear",
            "--adapters",
            tmp_path / "runs" / "a",
            tmp_path / "runs" / "b",
            "--out",
            tmp_path / "runs" / "a" / "merged",
        ]
    )
    one_error_line(r, "inside the input folder")
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_force_refuses_a_training_stage_and_folders_without_a_manifest(ab):
    write_adapter(ab / "stage", SHAPES, seed=3, lineage={"mode": None, "parent": None})
    assert json.loads((ab / "stage" / "emomerge.json").read_text())["kind"] == "stage_adapter"
    r = run(merge_args(ab, ab / "stage", "--force"))
    one_error_line(r, str(ab / "stage"), "kind 'stage_adapter'")
    assert (ab / "stage" / "adapter_model.safetensors").is_file()
    (ab / "mine").mkdir()
    (ab / "mine" / "notes.txt").write_text("keep")
    r = run(merge_args(ab, ab / "mine", "--force"))
    one_error_line(r, str(ab / "mine"), "no emomerge.json")
    assert (ab / "mine" / "notes.txt").read_text() == "keep"
    assert leftovers(ab, "mine") == [] and leftovers(ab, "stage") == []


def test_force_replaces_an_earlier_merge_or_an_empty_folder(ab):
    assert run(merge_args(ab, ab / "m")).exit_code == 0
    first = json.loads((ab / "m" / "emomerge.json").read_text())
    assert first["kind"] == "merge"
    r = run(
        [
            "linear",
            "--adapters",
            ab / "a",
            ab / "b",
            "--weights",
            "2",
            "1",
            "--out",
            ab / "m",
            "--force",
        ]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((ab / "m" / "emomerge.json").read_text())["params"]["weight"] == [2.0, 1.0]
    (ab / "empty").mkdir()
    assert run(merge_args(ab, ab / "empty", "--force")).exit_code == 0
    assert (ab / "empty" / "adapter_model.safetensors").is_file()
    assert leftovers(ab, "m") == [] and leftovers(ab, "empty") == []


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_file_at_out_is_one_line(ab, force):
    (ab / "out").write_text("precious")
    r = run(merge_args(ab, ab / "out", *force))
    one_error_line(r, str(ab / "out"), "exists and is not a folder")
    assert (ab / "out").read_text() == "precious"


# -- the final rename and the lock ---------------------------------------------------------
def test_a_folder_that_appears_while_merging_is_kept(ab, monkeypatch):
    real = engine.write_adapter_output

    def meanwhile(tmp, *args, **kwargs):
        (ab / "out").mkdir()
        (ab / "out" / "theirs.txt").write_text("written by someone else")
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(engine, "write_adapter_output", meanwhile)
    r = run(merge_args(ab, ab / "out"))
    one_error_line(r, str(ab / "out"), "appeared while")
    assert sorted(p.name for p in (ab / "out").iterdir()) == ["theirs.txt"]
    assert leftovers(ab, "out") == []


def test_a_second_writer_to_the_same_out_is_refused(ab):
    with atomic.out_lock(ab / "out"):
        lock = json.loads((ab / ".out.lock").read_text())
        assert lock == {"pid": os.getpid(), "host": atomic.HOST}
        r = run(merge_args(ab, ab / "out"))
        one_error_line(r, str(ab / "out"), "another emomerge", f"pid {os.getpid()}")
        assert not (ab / "out").exists()
    assert leftovers(ab, "out") == []  # released: the lock file is gone
    assert run(merge_args(ab, ab / "out")).exit_code == 0


@pytest.mark.slow
def test_two_concurrent_full_merges_one_wins_one_is_refused(ab):
    """Real processes: the second starts while the first is slowed inside its writer."""
    write_base(ab / "base", SHAPES)
    script = textwrap.dedent(f"""
        import os, sys, time
        from emomerge.merging import engine, output
        if sys.argv[1] == "slow":
            real = output.SafetensorsWriter.add
            def slow(self, *a, **k):  # holds the writer until the test says go
                for _ in range(600):
                    if os.path.exists(r"{ab / "go"}"):
                        break
                    time.sleep(0.1)
                return real(self, *a, **k)
            output.SafetensorsWriter.add = slow
        from emomerge.cli import main
        main(["linear", "--adapters", r"{ab / "a"}", r"{ab / "b"}", "--weights", sys.argv[2], "1",
              "--output", "full", "--base", r"{ab / "base"}", "--out", r"{ab / "out"}"])
    """)
    first = subprocess.Popen(
        [sys.executable, "-c", script, "slow", "1"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not leftovers(ab, "out") or not any(".tmp-" in n for n in leftovers(ab, "out")):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-c", script, "fast", "3"], capture_output=True, text=True, check=False
    )
    (ab / "go").touch()
    assert first.wait(60) == 0, first.stderr.read()
    assert second.returncode == 2 and "another emomerge" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1
    assert json.loads((ab / "out" / "emomerge.json").read_text())["params"]["weight"] == [1.0, 1.0]
    assert leftovers(ab, "out") == []


# -- leftovers of killed runs ----------------------------------------------------------------
def test_a_killed_full_merge_leaves_nothing_after_the_next_run(ab):
    write_base(ab / "base", SHAPES)
    script = textwrap.dedent(f"""
        import time
        from emomerge.merging import output
        real = output.SafetensorsWriter.add
        def stuck(self, *a, **k):
            real(self, *a, **k)
            time.sleep(60)
        output.SafetensorsWriter.add = stuck
        from emomerge.cli import main
        main(["linear", "--adapters", r"{ab / "a"}", r"{ab / "b"}", "--output", "full",
              "--base", r"{ab / "base"}", "--out", r"{ab / "out"}"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not any(
        (ab / n / "model.safetensors").exists() for n in leftovers(ab, "out") if ".tmp-" in n
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tmp = [n for n in leftovers(ab, "out") if ".tmp-" in n]
    assert len(tmp) == 1 and f"-{proc.pid}-" in tmp[0] and atomic.HOST in tmp[0]
    assert (ab / ".out.lock").exists()  # the holder died before releasing it

    r = run(
        [
            "linear",
            "--adapters",
            ab / "a",
            ab / "b",
            "--output",
            "full",
            "--base",
            ab / "base",
            "--out",
            ab / "out",
        ]
    )
    assert r.exit_code == 0, r.output
    assert f"removed {ab / tmp[0]}, left by emomerge pid {proc.pid} (no longer running)" in r.stderr
    assert "stale lock" in r.stderr
    assert leftovers(ab, "out") == []
    assert (ab / "out" / "model.safetensors").is_file()


def test_temporaries_of_live_processes_and_other_hosts_are_left_alone(ab):
    live = ab / f".out.tmp-{atomic.HOST}-{os.getpid()}-abcd"
    other = ab / ".out.tmp-some-other-host-1-abcd"
    live.mkdir()
    other.mkdir()
    assert run(merge_args(ab, ab / "out")).exit_code == 0
    assert live.is_dir() and other.is_dir()


# -- full disks and permissions --------------------------------------------------------------
@pytest.mark.parametrize(
    "code,text",
    [
        (errno.ENOSPC, "no space left on device writing"),
        (errno.EACCES, "permission denied writing"),
    ],
)
def test_disk_errors_are_one_line_and_leave_nothing(ab, monkeypatch, code, text):
    write_base(ab / "base", SHAPES)
    real = engine.write_full_output

    def fails(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)  # the bytes are there: the failure comes late
        raise OSError(code, os.strerror(code), str(tmp / "model.safetensors"))

    monkeypatch.setattr(engine, "write_full_output", fails)
    r = run(
        [
            "linear",
            "--adapters",
            ab / "a",
            ab / "b",
            "--output",
            "full",
            "--base",
            ab / "base",
            "--out",
            ab / "out",
        ]
    )
    line = one_error_line(r, f"{text} {ab / 'out'}")
    if code == errno.ENOSPC:
        size = (ab / "base" / "model.safetensors").stat().st_size  # tensors + header
        needed = float(line.split("needed ≈ ")[1].split(" GB")[0])
        assert abs(needed * 1e9 - size) < 0.01e9
    assert not (ab / "out").exists() and leftovers(ab, "out") == []


# -- export-mergekit -----------------------------------------------------------------------
def recipe(ab):
    path = ab / "r.yaml"
    path.write_text(
        f"merge_method: ties\nmodels:\n  - model: {ab / 'a'}\n  - model: {ab / 'b'}\n"
        "parameters: {density: 0.5}\n"
    )
    return path


def test_export_refuses_to_overwrite_its_recipe_or_other_files(ab):
    path = recipe(ab)
    text = path.read_text()
    r = run(["export-mergekit", path, "--base", "/models/base", "--out", path, "--force"])
    one_error_line(r, "is the input")
    assert path.read_text() == text
    (ab / "notes.yaml").write_text("mine: 1\n")
    r = run(
        ["export-mergekit", path, "--base", "/models/base", "--out", ab / "notes.yaml", "--force"]
    )
    one_error_line(r, "not a YAML exported by emomerge")
    assert (ab / "notes.yaml").read_text() == "mine: 1\n"
    assert (
        run(["export-mergekit", path, "--base", "/models/base", "--out", ab / "x.yaml"]).exit_code
        == 0
    )
    r = run(["export-mergekit", path, "--base", "/models/other", "--out", ab / "x.yaml", "--force"])
    assert r.exit_code == 0 and "/models/other" in (ab / "x.yaml").read_text()
    assert leftovers(ab, "x.yaml") == []


def test_a_failed_export_leaves_no_temporary(ab, monkeypatch):
    path = recipe(ab)
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("x.yaml"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    r = run(["export-mergekit", path, "--base", "/models/base", "--out", ab / "x.yaml"])
    one_error_line(r, f"no space left on device writing {ab / 'x.yaml'}")
    assert not (ab / "x.yaml").exists() and leftovers(ab, "x.yaml") == []
