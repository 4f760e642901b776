"""Every recipe in merge_configs/ loads, runs on four stage adapters and exports for mergekit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.merging import merge
from emomerge.merging.engine import get_method
from emomerge.merging.recipe import export_mergekit, load_recipe, recipe_params, run_recipe

from .helpers import lm_modules, write_adapter

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "merge_configs").glob("*.yaml"))
STAGES = ["emoart", "emid", "mangavqa", "emocomics35"]
SHAPES = lm_modules(layers=1, hidden=8, inter=12)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    dense = [
        write_adapter(root / "adapters" / s, SHAPES, seed=i, r=2 + i) for i, s in enumerate(STAGES)
    ]
    return root, dense


def test_there_is_one_recipe_per_method():
    from emomerge.merging import METHODS

    assert {load_recipe(p).merge_method for p in CONFIGS} == set(METHODS)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_runs_like_the_direct_call(config, run_root, tmp_path):
    root, _ = run_root
    recipe = load_recipe(config)
    assert (
        config.read_text().startswith("# ")
        and "emomerge merge merge_configs/" in config.read_text()
    )
    res = run_recipe(config, tmp_path / "r", root=root)
    method = get_method(recipe.merge_method)
    merge(
        method.name,
        [root / "adapters" / s for s in STAGES],
        tmp_path / "d",
        params=recipe_params(recipe, method),
        rank=recipe.emomerge.rank,
        seed=recipe.emomerge.seed,
    )
    a = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "d" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.manifest["recipe"]["merge_method"] == recipe.merge_method
    # every recipe exports to mergekit YAML that mergekit's own schema accepts, or is refused
    # with a clear reason when mergekit cannot express the method or space
    from mergekit.config import MergeConfiguration

    if method.mergekit is None or recipe.parameters.get("space", "dense") != "dense":
        with pytest.raises(Exception, match="mergekit"):
            export_mergekit(recipe, base_model="/models/base", root=root)
        return
    text = export_mergekit(recipe, base_model="/models/base", root=root)
    MergeConfiguration.model_validate(yaml.safe_load(text))


def test_linear_recipe_is_the_weighted_average(run_root, tmp_path):
    root, dense = run_root
    run_recipe(CONFIGS[[p.stem for p in CONFIGS].index("linear")], tmp_path / "lin", root=root)
    t = load_file(str(tmp_path / "lin" / "adapter_model.safetensors"))
    w = [0.2, 0.2, 0.2, 0.4]
    for path in SHAPES:
        got = (
            t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
        expect = sum(wi * d[path] for wi, d in zip(w, dense)) / sum(w)
        np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=1e-6)


def test_per_tensor_filters(run_root, tmp_path):
    root, dense = run_root
    recipe = tmp_path / "f.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "models": [{"model": f"adapters/{s}"} for s in STAGES],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]},
            }
        )
    )
    run_recipe(recipe, tmp_path / "out", root=root)
    t = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for path in SHAPES:
        got = (
            t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
        expect = 0 * dense[0][path] if "self_attn" in path else sum(d[path] for d in dense)
        np.testing.assert_allclose(got.numpy(), np.asarray(expect), atol=1e-6)


@pytest.mark.parametrize(
    "body,needle",
    [
        (
            {"merge_method": "ties", "models": [{"model": "adapters/emoart"}], "paramters": {}},
            "key 'paramters': unknown key",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "adapters/emoart", "parameters": {"density": 2}}],
            },
            "'density' must be in (0, 1]",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "adapters/emoart", "parameters": {"densty": 0.5}}],
            },
            "models.0.parameters.densty",
        ),
        (
            {"merge_method": "frankenmerge", "models": [{"model": "adapters/emoart"}]},
            "key 'merge_method'",
        ),
        ({"merge_method": "ties", "models": []}, "key 'models'"),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"output": "gguf"}},
            "key 'emomerge.output'",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"rank": "auto"}},
            "key 'emomerge.rank': auto needs emomerge.max_error",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "a"}],
                "emomerge": {"rank": 8, "max_error": 0.1},
            },
            "key 'emomerge.max_error': needs emomerge.rank: auto",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"max_error": 0.1}},
            "key 'emomerge.max_error': needs emomerge.rank: auto",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "a"}],
                "emomerge": {"rank": "auto", "max_error": 1.0},
            },
            "key 'emomerge.max_error': must be a number in (0, 1)",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "a"}],
                "emomerge": {"rank": "auto", "max_error": float("nan")},
            },
            "key 'emomerge.max_error': must be a number in (0, 1)",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"rank": "full"}},
            "key 'emomerge.rank': must be a positive integer or auto, got 'full'",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"rank": 0}},
            "key 'emomerge.rank': must be a positive integer or auto, got 0",
        ),
    ],
)
def test_bad_recipes_fail_with_one_line(tmp_path, body, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(body))
    r = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and str(recipe) in r.stderr and needle in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_export_refuses_stacked_chains(tmp_path):
    write_adapter(tmp_path / "s1", SHAPES, seed=1)
    write_adapter(tmp_path / "s2", SHAPES, seed=2, lineage={"mode": "stacked", "parent": "../s1"})
    recipe = load_recipe(
        _write(
            tmp_path / "r.yaml",
            {"merge_method": "linear", "models": [{"model": "s1"}, {"model": "s2"}]},
        )
    )
    with pytest.raises(Exception, match="stacked lineage"):
        export_mergekit(recipe, base_model="/m", root=tmp_path)


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return path


def test_export_writes_a_local_base_as_an_absolute_path(run_root, tmp_path, monkeypatch):
    """mergekit takes a relative 'dir/name' for a hub id (its model card then queries the hub)."""
    root, _ = run_root
    (tmp_path / "demo" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(CONFIGS[[p.stem for p in CONFIGS].index("ties")])
    doc = yaml.safe_load(export_mergekit(recipe, base_model="demo/tiny", root=root))
    assert doc["base_model"] == str(tmp_path / "demo" / "tiny")
    assert all(m["model"].startswith(str(tmp_path / "demo" / "tiny") + "+/") for m in doc["models"])
    hub = yaml.safe_load(
        export_mergekit(recipe, base_model="Qwen/Qwen2.5-VL-7B-Instruct", root=root)
    )
    assert hub["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct"


def _ties_recipe(path, emomerge=None):
    body = {
        "merge_method": "ties",
        "models": [{"model": f"adapters/{s}"} for s in STAGES],
        "parameters": {"density": 0.5},
    }
    if emomerge is not None:
        body["emomerge"] = emomerge
    return _write(path, body)


def _dense_ties(dense, path):
    from emomerge.merging.engine import apply_method, resolve_params

    m = get_method("ties")
    resolved = resolve_params(m, len(dense), {"density": 0.5})
    return apply_method(m, torch.stack([d[path] for d in dense]), resolved, seed=0, module=path)


def _errors(out, dense):
    t = load_file(str(out / "adapter_model.safetensors"))
    errs = {}
    for path in SHAPES:
        got = (
            t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
        d = _dense_ties(dense, path)
        errs[path] = float(torch.linalg.matrix_norm(got - d) / torch.linalg.matrix_norm(d))
    return errs


def test_merge_warns_when_the_recipe_adapter_is_far_from_the_merge(run_root, tmp_path):
    root, dense = run_root
    recipe = _ties_recipe(tmp_path / "t.yaml")
    r = CliRunner().invoke(
        app, ["merge", str(recipe), "--out", str(tmp_path / "o"), "--root", str(root)]
    )
    assert r.exit_code == 0, r.output
    errs = _errors(tmp_path / "o", dense)
    mean = sum(errs.values()) / len(errs)
    assert mean > 0.10
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1, r.stderr
    assert f"{mean:.1%}" in lines[0] and "emomerge.output: full" in lines[0]
    assert "emomerge.rank: auto with emomerge.max_error" in lines[0]


def test_recipe_rank_auto(run_root, tmp_path):
    """rank: auto + max_error: every module within E, no warning, the rule in the manifest."""
    root, dense = run_root
    recipe = _ties_recipe(tmp_path / "t.yaml", {"rank": "auto", "max_error": 0.25})
    r = CliRunner().invoke(
        app, ["merge", str(recipe), "--out", str(tmp_path / "o"), "--root", str(root)]
    )
    assert r.exit_code == 0, r.output
    assert "warning:" not in r.stderr
    import json

    man = json.loads((tmp_path / "o" / "emomerge.json").read_text())
    assert (
        man["rank_rule"] == "auto, max_error 0.25" and man["recipe"]["emomerge"]["rank"] == "auto"
    )
    errs = _errors(tmp_path / "o", dense)
    for path, err in errs.items():
        assert err <= 0.25 + 1e-6
        assert err == pytest.approx(man["errors"]["relative_frobenius"][path], abs=1e-5)
        # these modules are small: the exact SVD, so rank − 1 of the dense TIES exceeds E
        assert man["refactor"][path]["refactor"] == "svd"
        s2 = torch.linalg.svd(_dense_ties(dense, path)).S.square()
        k = man["ranks"][path]
        assert float(s2[k - 1 :].sum() / s2.sum()) ** 0.5 > 0.25
