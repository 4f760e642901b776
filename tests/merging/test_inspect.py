"""`emomerge inspect`: norms and cosines from the factors equal the dense computation."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from emomerge.cli import app

from .helpers import lm_modules, write_adapter

SHAPES = lm_modules(layers=2, hidden=12, inter=20)


def test_inspect_reports_geometry_and_lineage(tmp_path):
    dense = [
        write_adapter(tmp_path / "s1", SHAPES, seed=1, r=3, lineage={"mode": None, "parent": None}),
        write_adapter(
            tmp_path / "s2",
            SHAPES,
            seed=2,
            r=5,
            rslora=True,
            lineage={"mode": "stacked", "parent": "../s1"},
        ),
    ]
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s1"), str(tmp_path / "s2"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    flat = [np.concatenate([d[p].numpy().ravel() for p in SHAPES]) for d in dense]
    tau = [flat[0], flat[0] + flat[1]]  # stacked: stage 2's task vector is the chain's sum
    norms = [np.linalg.norm(t) for t in tau]
    np.testing.assert_allclose(
        [a["task_vector_norm"] for a in report["adapters"]], norms, rtol=1e-6
    )
    cos = tau[0] @ tau[1] / (norms[0] * norms[1])
    np.testing.assert_allclose(report["cosine"], [[1, cos], [cos, 1]], rtol=1e-6)
    assert report["adapters"][1]["lineage"] == {
        "stage": None,
        "mode": "stacked",
        "parent": "../s1",
        "parent_sha256_ok": None,
    }
    assert report["adapters"][1]["ranks"] == [5] and report["adapters"][1]["rslora"] is True
    # the table form prints too
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert r.exit_code == 0 and "cosine similarity" in r.stdout


def test_narrow_terminal_shows_what_tells_the_adapters_apart(tmp_path):
    root = tmp_path / "runs" / "demo" / "adapters"
    names = ["emoart", "emocomics35"]
    for i, name in enumerate(names):
        write_adapter(root / name, SHAPES, seed=i, r=3)
    r = CliRunner().invoke(app, ["inspect", *(str(root / n) for n in names)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in r.stdout
    rows = [ln for ln in lines if ln.startswith("│ ") and ln[2].isdigit()]
    # the table names each adapter by what differs (whole), the common folder in its title
    assert [ln.split("│")[2].strip() for ln in rows[:2]] == names
    title = "".join(
        ln.strip() for ln in lines[: lines.index(next(ln for ln in lines if ln.startswith("┏")))]
    )
    assert f"in{root}/;" in title.replace(" ", "") and f"{root}/emoart" not in r.stdout
    csv_out = CliRunner().invoke(
        app, ["inspect", *(str(root / n) for n in names), "--format", "csv"]
    )
    assert csv_out.exit_code == 0, csv_out.output
    head, first, second = csv_out.stdout.splitlines()[:3]
    assert head.startswith("#,adapter,base,") and head.endswith("cos 0,cos 1")
    assert first.startswith("0,emoart,") and second.startswith("1,emocomics35,")
    assert first.endswith(",+1.000," + second.split(",")[-2])  # symmetric cosines


def test_short_paths():
    from emomerge.merging.inspect import short_paths

    assert short_paths(["runs/demo/adapters/emoart", "runs/demo/adapters/emid"]) == (
        "runs/demo/adapters",
        ["emoart", "emid"],
    )
    assert short_paths(["runs/a/x/s1", "runs/b/s1"]) == ("runs", ["a/x/s1", "b/s1"])
    assert short_paths(["/m/one"]) == ("/m", ["one"])
    assert short_paths(["a/s1", "b/s1"]) == ("", ["a/s1", "b/s1"])


def test_methods_keep_every_paper_link_whole_at_any_width():
    from emomerge.merging import METHODS

    for columns in ("80", "140"):
        r = CliRunner().invoke(app, ["methods"], env={"COLUMNS": columns})
        assert r.exit_code == 0, r.output
        assert "…" not in r.stdout
        assert all(m.paper in r.stdout for m in METHODS.values()), columns
        assert max(map(len, r.stdout.splitlines())) <= int(columns)
    md = CliRunner().invoke(app, ["methods", "--format", "json"])
    assert [m["paper"] for m in json.loads(md.stdout)] == [m.paper for m in METHODS.values()]
