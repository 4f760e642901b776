"""Inputs that used to be silently wrong: non-finite numbers, Breadcrumbs' effective gamma,
changed lineage parents, a base of another model, undecodable recipes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import build_task_vectors, merge, sparsify
from emomerge.merging.adapters import sha256_file
from emomerge.merging.errors import MergeInputError

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


def run(args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def one_error_line(result, *needles, out=None):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


@pytest.fixture()
def ab(tmp_path):
    write_adapter(tmp_path / "a", SHAPES, seed=1)
    write_adapter(tmp_path / "b", SHAPES, seed=2)
    return tmp_path


# -- non-finite numbers ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["linear", "--weights", "nan", "1"], "'weight' must be a finite number, got nan"),
        (["task-arithmetic", "--weights", "1", "inf"], "'weight' must be a finite number, got inf"),
        (["ties", "--density", "nan"], "'density' must be a finite number, got nan"),
        (["task-arithmetic", "--lambda", "inf"], "'lambda' must be a finite number, got inf"),
        (["breadcrumbs", "--density", "0.5", "--gamma", "nan"], "'gamma' must be a finite number"),
        (["della", "--density", "0.5", "--epsilon", "-inf"], "'epsilon' must be a finite number"),
        (["tsv", "--fraction", "nan"], "'fraction' must be a finite number"),
    ],
)
def test_non_finite_options_are_one_line(ab, args, needle):
    r = run([args[0], "--adapters", ab / "a", ab / "b", *args[1:], "--out", ab / "out"])
    one_error_line(r, needle, out=ab / "out")


@pytest.mark.parametrize(
    "params,needle",
    [
        ("{lambda: .inf}", "'lambda' must be a finite number, got inf"),
        (
            "{density: [{filter: q_proj, value: .nan}, {value: 0.5}]}",
            "'density' must be a finite number",
        ),
        ("{density: [{filter: q_proj, value: 7}, {value: 0.5}]}", "'density' must be in (0, 1]"),
    ],
)
def test_non_finite_recipe_values_are_one_line(ab, params, needle):
    recipe = ab / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nmodels:\n  - model: a\n  - model: b\nparameters: {params}\n"
    )
    r = run(["merge", recipe, "--root", ab, "--out", ab / "out"])
    one_error_line(r, str(recipe), needle, out=ab / "out")


def test_undecodable_recipe_is_one_line(ab):
    recipe = ab / "r.yaml"
    recipe.write_bytes(b"merge_method: ties\nmodels:\n  - model: a\xff\xfe\n")
    one_error_line(
        run(["merge", recipe, "--root", ab, "--out", ab / "out"]),
        str(recipe),
        "not a UTF-8 text file (undecodable byte 0xff at offset",
        out=ab / "out",
    )


# -- Breadcrumbs with density + gamma > 1 ------------------------------------------------------
def test_breadcrumbs_effective_gamma_matches_mergekit_and_the_manifest(ab):
    from mergekit.sparsify import magnitude_outliers as mk_outliers

    t = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    n = t.numel()
    ours = sparsify.magnitude_outliers(t, 0.9, gamma=0.2)
    np.testing.assert_array_equal(ours.numpy(), mk_outliers(t, 0.9, gamma=0.2).numpy())
    # density is kept; the cut is the n − int(0.9 n) largest, i.e. gamma 0.1, not 0.2
    kept = ours != 0
    assert int(kept.sum()) == int(0.9 * n)
    order = torch.argsort(t.abs().reshape(-1), descending=True)
    assert not kept.reshape(-1)[order[: n - int(0.9 * n)]].any()
    assert kept.reshape(-1)[order[n - int(0.9 * n) :]].all()

    r = run(
        [
            "breadcrumbs",
            "--adapters",
            ab / "a",
            ab / "b",
            "--density",
            "0.9",
            "0.5",
            "--gamma",
            "0.2",
            "0.2",
            "--out",
            ab / "m",
        ]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((ab / "m" / "emomerge.json").read_text())
    assert manifest["params"]["gamma"] == [0.2, 0.2]
    np.testing.assert_allclose(manifest["gamma_effective"], [0.1, 0.2])


# -- lineage integrity -----------------------------------------------------------------------
def stacked_pair(root, mode="stacked"):
    d1 = write_adapter(root / "s1", SHAPES, seed=1, lineage={"mode": None, "parent": None})
    sha = sha256_file(root / "s1" / "adapter_model.safetensors")
    d2 = write_adapter(
        root / "s2", SHAPES, seed=2, lineage={"mode": mode, "parent": "../s1", "parent_sha256": sha}
    )
    return d1, d2


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_a_parent_overwritten_after_its_child_is_refused(tmp_path, reference):
    stacked_pair(tmp_path)
    assert (
        run(
            [
                "task-arithmetic",
                "--adapters",
                tmp_path / "s2",
                "--reference",
                reference,
                "--out",
                tmp_path / "ok",
            ]
        ).exit_code
        == 0
    )
    write_adapter(
        tmp_path / "s1", SHAPES, seed=9, lineage={"mode": None, "parent": None}
    )  # retrained
    args = [
        "task-arithmetic",
        "--adapters",
        tmp_path / "s2",
        "--reference",
        reference,
        "--out",
        tmp_path / "m",
    ]
    one_error_line(
        run(args),
        str(tmp_path / "s1" / "adapter_model.safetensors"),
        str(tmp_path / "s2" / "emomerge.json"),
        "--allow-lineage-mismatch",
        out=tmp_path / "m",
    )
    r = run(args + ["--allow-lineage-mismatch"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "m" / "emomerge.json").read_text())
    assert manifest["allow_lineage_mismatch"] is True
    [entry] = manifest["lineage_mismatches"]
    assert entry["child"] == str(tmp_path / "s2")
    assert entry["found_sha256"] == sha256_file(tmp_path / "s1" / "adapter_model.safetensors")
    assert entry["recorded_sha256"] != entry["found_sha256"]


def test_inspect_shows_a_changed_parent(tmp_path):
    stacked_pair(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s2"), "--json"])
    assert json.loads(r.stdout)["adapters"][0]["lineage"]["parent_sha256_ok"] is True
    write_adapter(tmp_path / "s1", SHAPES, seed=9, lineage={"mode": None, "parent": None})
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s2"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["adapters"][0]["lineage"]["parent_sha256_ok"] is False
    assert report["lineage_mismatches"][0]["child"] == str(tmp_path / "s2")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s2")])
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert str(tmp_path / "s1" / "adapter_model.safetensors") in line and "sha256 differs" in line


def test_continued_child_with_reference_base_needs_no_parent(tmp_path):
    _, d2 = stacked_pair(tmp_path, mode="continued")
    shutil.rmtree(tmp_path / "s1")
    tv = build_task_vectors([tmp_path / "s2"], reference="base")
    for path in SHAPES:  # continued: the child's LoRA is the whole update from the base
        np.testing.assert_allclose(tv.dense(0, path, torch.float64).numpy(), d2[path], atol=1e-12)
    assert "not on disk" in tv.lineage_assumed[0]
    result = merge("task_arithmetic", [tmp_path / "s2"], tmp_path / "m")
    assert result.manifest["lineage_assumed"] == tv.lineage_assumed
    with pytest.raises(MergeInputError, match="lineage parent '../s1' not found"):
        build_task_vectors([tmp_path / "s2"], reference="previous")
    # stacked children still need it: their task vector contains the parent's update
    stacked_pair(tmp_path / "st")
    shutil.rmtree(tmp_path / "st" / "s1")
    with pytest.raises(MergeInputError, match="not found"):
        build_task_vectors([tmp_path / "st" / "s2"], reference="base")


# -- the base of --output full ---------------------------------------------------------------
LLAVA_KEYS = {
    p.replace("model.layers", "language_model.model.layers"): s for p, s in SHAPES.items()
}


def qwen_adapters(root):
    for name, seed in (("q1", 1), ("q2", 2)):
        write_adapter(root / name, SHAPES, seed=seed, base="Qwen/Qwen2.5-VL-7B-Instruct")


def test_full_output_refuses_a_base_of_another_model_type(tmp_path):
    qwen_adapters(tmp_path)
    write_base(tmp_path / "llava", LLAVA_KEYS, model_type="llava")
    args = [
        "linear",
        "--adapters",
        tmp_path / "q1",
        tmp_path / "q2",
        "--output",
        "full",
        "--base",
        tmp_path / "llava",
        "--out",
        tmp_path / "m",
    ]
    one_error_line(
        run(args),
        str(tmp_path / "q1"),
        "qwen2_5_vl",
        "llava",
        "--allow-different-bases",
        out=tmp_path / "m",
    )
    r = run(args + ["--allow-base-mismatch"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "emomerge.json").read_text())["allow_base_mismatch"] is True
    r = run(args[:-1] + [tmp_path / "m2", "--force"])  # --force replaces outputs, nothing else
    one_error_line(r, str(tmp_path / "q1"), "--allow-different-bases", out=tmp_path / "m2")
    r = run(args[:-1] + [tmp_path / "m3", "--allow-different-bases"])
    assert r.exit_code == 0, r.output


def test_family_recorded_by_training_is_checked_and_a_matching_base_passes(tmp_path):
    qwen_adapters(tmp_path)
    write_base(tmp_path / "qwen", SHAPES, model_type="qwen2_5_vl")
    r = run(
        [
            "linear",
            "--adapters",
            tmp_path / "q1",
            tmp_path / "q2",
            "--output",
            "full",
            "--base",
            tmp_path / "qwen",
            "--out",
            tmp_path / "m",
        ]
    )
    assert r.exit_code == 0, r.output
    write_adapter(tmp_path / "s", SHAPES, seed=3, base="some/renamed-folder")
    (tmp_path / "s" / "emomerge.json").write_text(
        json.dumps(
            {
                "kind": "stage_adapter",
                "lineage": {"mode": None, "parent": None},
                "base": {"name_or_path": "some/renamed-folder", "family": "mllama"},
            }
        )
    )
    one_error_line(
        run(
            [
                "linear",
                "--adapters",
                tmp_path / "s",
                "--output",
                "full",
                "--base",
                tmp_path / "qwen",
                "--out",
                tmp_path / "m2",
            ]
        ),
        "mllama",
        "base.family",
        "qwen2_5_vl",
        out=tmp_path / "m2",
    )
