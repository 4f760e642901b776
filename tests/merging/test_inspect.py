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
        write_adapter(tmp_path / "s2", SHAPES, seed=2, r=5, rslora=True,
                      lineage={"mode": "stacked", "parent": "../s1"}),
    ]
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s1"), str(tmp_path / "s2"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    flat = [np.concatenate([d[p].numpy().ravel() for p in SHAPES]) for d in dense]
    tau = [flat[0], flat[0] + flat[1]]  # stacked: stage 2's task vector is the chain's sum
    norms = [np.linalg.norm(t) for t in tau]
    np.testing.assert_allclose([a["task_vector_norm"] for a in report["adapters"]], norms, rtol=1e-6)
    cos = tau[0] @ tau[1] / (norms[0] * norms[1])
    np.testing.assert_allclose(report["cosine"], [[1, cos], [cos, 1]], rtol=1e-6)
    assert report["adapters"][1]["lineage"] == {"stage": None, "mode": "stacked", "parent": "../s1",
                                                "parent_sha256_ok": None}
    assert report["adapters"][1]["ranks"] == [5] and report["adapters"][1]["rslora"] is True
    # the table form prints too
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert r.exit_code == 0 and "cosine similarity" in r.stdout
