"""Lineage is never lost silently: ``--reference previous`` without a recorded lineage is one line
and exit 2; ``emomerge lineage set/show`` records and reads it for adapters trained elsewhere, and
the task vectors then follow it (checked against the dense definitions of the two modes)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import build_task_vectors

from .helpers import lm_modules, write_adapter

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


def run(*args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def plain(tmp_path):
    """Three stage adapters trained 'elsewhere': PEFT files only, no emomerge.json."""
    dense = [write_adapter(tmp_path / f"s{i}", SHAPES, seed=i) for i in (1, 2, 3)]
    return tmp_path, dense


def test_reference_previous_without_lineage_is_one_line(plain):
    root, _ = plain
    out = root / "out"
    result = run(
        "task-arithmetic",
        "--adapters",
        root / "s1",
        root / "s2",
        "--reference",
        "previous",
        "--out",
        out,
    )
    one_line_error(
        result,
        str(root / "s1"),
        "--reference previous",
        "emomerge lineage set",
        "--parent",
        "--mode continued|stacked",
    )
    assert not out.exists()
    # every place that needs a parent: inspect and the library call too
    one_line_error(run("inspect", root / "s1", "--reference", "previous"), str(root / "s1"))
    with pytest.raises(Exception, match="emomerge lineage set"):
        build_task_vectors([root / "s2"], reference="previous")


@pytest.mark.parametrize("mode", ["continued", "stacked"])
def test_lineage_set_then_task_vectors_follow_it(plain, mode):
    root, (d1, d2, d3) = plain
    assert run("lineage", "set", root / "s1", "--mode", mode).exit_code == 0
    r2 = run("lineage", "set", root / "s2", "--parent", root / "s1", "--mode", mode)
    assert r2.exit_code == 0, r2.output
    assert (
        run("lineage", "set", root / "s3", "--parent", root / "s2", "--mode", mode).exit_code == 0
    )

    doc = json.loads((root / "s2" / "emomerge.json").read_text())
    assert doc["kind"] == "stage_adapter"
    assert doc["lineage"]["mode"] == mode and doc["lineage"]["parent"] == "../s1"
    want_sha = hashlib.sha256((root / "s1" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert doc["lineage"]["parent_sha256"] == want_sha
    assert doc["lineage_recorded_by"] == "emomerge lineage set"
    assert json.loads((root / "s1" / "emomerge.json").read_text())["lineage"]["parent"] is None
    assert not [
        p for p in root.joinpath("s2").iterdir() if p.name.startswith(".")
    ]  # no temporaries

    # The model after each stage, from the definitions (docs/DESIGN.md, Words), and τ relative to
    # each reference.
    if mode == "stacked":
        model = [d1, {p: d1[p] + d2[p] for p in SHAPES}, {p: d1[p] + d2[p] + d3[p] for p in SHAPES}]
    else:
        model = [d1, d2, d3]
    for reference in ("base", "previous"):
        tv = build_task_vectors([root / "s1", root / "s2", root / "s3"], reference=reference)
        for i in range(3):
            for path in SHAPES:
                expect = model[i][path] - (
                    model[i - 1][path] if reference == "previous" and i else 0
                )
                np.testing.assert_allclose(
                    tv.dense(i, path, torch.float64).numpy(), expect, atol=1e-12
                )

    shown = run("lineage", "show", root / "s3")
    assert shown.exit_code == 0
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == 3  # s3 ← s2 ← s1 ← base
    assert f"{mode} ← ../s2, parent sha256 ok" in lines[0]
    assert "← base" in lines[2] and "recorded by emomerge lineage set" in lines[2]


def test_parent_changed_after_lineage_set_is_refused(plain):
    root, _ = plain
    run("lineage", "set", root / "s1", "--mode", "continued")
    run("lineage", "set", root / "s2", "--parent", root / "s1", "--mode", "continued")
    write_adapter(root / "s1", SHAPES, seed=99)  # the parent retrained behind our back
    result = run(
        "task-arithmetic",
        "--adapters",
        root / "s1",
        root / "s2",
        "--reference",
        "previous",
        "--out",
        root / "out",
    )
    one_line_error(result, "sha256", "--allow-lineage-mismatch")
    assert "DIFFERS" in run("lineage", "show", root / "s2").stdout


def test_training_lineage_needs_force(tmp_path):
    write_adapter(tmp_path / "s1", SHAPES, seed=1, lineage={"mode": None, "parent": None})
    write_adapter(tmp_path / "s2", SHAPES, seed=2, lineage={"mode": "continued", "parent": "../s1"})
    meta = tmp_path / "s2" / "emomerge.json"
    before = meta.read_text()
    result = run(
        "lineage", "set", tmp_path / "s2", "--parent", tmp_path / "s1", "--mode", "stacked"
    )
    one_line_error(result, str(meta), "recorded by training", "--force")
    assert meta.read_text() == before
    forced = run(
        "lineage",
        "set",
        tmp_path / "s2",
        "--parent",
        tmp_path / "s1",
        "--mode",
        "stacked",
        "--force",
    )
    assert forced.exit_code == 0, forced.output
    doc = json.loads(meta.read_text())
    assert doc["lineage"]["mode"] == "stacked"
    assert doc["lineage_replaced"] == {"mode": "continued", "parent": "../s1"}
    # once recorded by lineage set, it may be set again without --force
    assert (
        run(
            "lineage", "set", tmp_path / "s2", "--parent", tmp_path / "s1", "--mode", "continued"
        ).exit_code
        == 0
    )


def test_lineage_set_bad_input(plain, tmp_path):
    root, _ = plain
    one_line_error(
        run("lineage", "set", root / "s2", "--parent", root / "nope", "--mode", "stacked"),
        str(root / "nope"),
    )
    one_line_error(
        run("lineage", "set", root / "s2", "--parent", root / "s1", "--mode", "sideways"),
        "--mode must be continued or stacked",
    )
    one_line_error(
        run("lineage", "set", root / "s2", "--parent", root / "s2", "--mode", "stacked"),
        "the adapter itself",
    )
    run("lineage", "set", root / "s2", "--parent", root / "s1", "--mode", "stacked")
    one_line_error(
        run("lineage", "set", root / "s1", "--parent", root / "s2", "--mode", "stacked"),
        "lineage would loop",
    )
    merged = root / "merged"
    assert run("linear", "--adapters", root / "s1", root / "s3", "--out", merged).exit_code == 0
    one_line_error(
        run("lineage", "set", merged, "--parent", root / "s1", "--mode", "stacked"), "kind 'merge'"
    )
    assert json.loads((merged / "emomerge.json").read_text())["kind"] == "merge"


def test_manifest_lists_adapters_merged_without_lineage(plain):
    root, _ = plain
    run("lineage", "set", root / "s1", "--mode", "continued")
    assert run("linear", "--adapters", root / "s1", root / "s2", "--out", root / "m").exit_code == 0
    manifest = json.loads((root / "m" / "emomerge.json").read_text())
    assert manifest["lineage_missing"] == [str(root / "s2")]
