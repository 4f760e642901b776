"""One dtype rule, both ways: a merge is computed in float32; a recipe's bf16/fp16 ``dtype`` (or
its ``out_dtype``) is the dtype the weights are *stored* in.

Direction 1: an emomerge recipe with ``dtype: bfloat16`` run natively against mergekit's
``run_merge`` on the exported YAML (``dtype: float32`` + ``out_dtype: bfloat16``). Direction 2: a
YAML written for mergekit (``base+adapter`` models, ``dtype: float32``, ``out_dtype: bfloat16``)
run by both. The float32 results agree per tensor at float32 rounding (TIES: within the
trim-threshold flip budget of docs/DESIGN.md, Facts); each tool's bf16 output is its own float32 result
rounded once, so the two bf16 outputs differ only where that rounding flips. The YAML we used to
export (``dtype: bfloat16``) makes mergekit compute in bf16, and is shown to disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from emomerge.merging.recipe import Recipe, dtypes, export_mergekit, run_recipe

from . import tiny_models as T
from .test_mergekit_oracle import FLIP_BUDGET, TOL, compare, run_mergekit

pytest.importorskip("mergekit")

WEIGHTS = [0.5, 0.3, 0.8]
CASES = {
    "task_arithmetic": ("task_arithmetic", {"weight": WEIGHTS}, {"lambda": 0.7}, False),
    "ties": ("ties", {"weight": WEIGHTS, "density": [0.5, 0.7, 0.3]}, {"lambda": 0.9}, True),
}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> T.Tiny:
    return T.tiny_family(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_merge_cache_dtype")


def recipe_doc(tiny: T.Tiny, method: str, per: dict, glob: dict, **dtype) -> dict:
    models = [
        {"model": str(a), "parameters": {k: v[i] for k, v in per.items()}}
        for i, a in enumerate(tiny.adapters)
    ]
    return {
        "merge_method": method,
        "base_model": str(tiny.base),
        "models": models,
        "parameters": glob,
        "emomerge": {"output": "full"},
        **dtype,
    }


def run_native(doc: dict, folder: Path) -> dict[str, torch.Tensor]:
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(doc))
    run_recipe(path, folder)
    return T.load_state(folder)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at each element (8 significant bits)."""
    x = x.double().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def test_rule_reads_the_same_from_a_recipe():
    def rec(**kw):
        return Recipe.model_validate({"merge_method": "linear", "models": [{"model": "a"}], **kw})

    assert dtypes(rec()) == ("float32", None)
    assert dtypes(rec(dtype="bfloat16")) == ("float32", "bfloat16")
    assert dtypes(rec(dtype="float16")) == ("float32", "float16")
    assert dtypes(rec(dtype="float64")) == ("float64", None)
    assert dtypes(rec(dtype="bfloat16", out_dtype="float32")) == ("float32", "float32")


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_recipe_matches_mergekit_on_the_export(case, qwen, lora_cache, tmp_path):
    method, per, glob, trimming = CASES[case]
    doc = recipe_doc(qwen, method, per, glob, dtype="bfloat16")
    exported = yaml.safe_load(
        export_mergekit(Recipe.model_validate(doc), base_model=str(qwen.base), root=tmp_path)
    )
    assert (exported["dtype"], exported["out_dtype"]) == ("float32", "bfloat16")

    ours = run_native(doc, tmp_path / "ours")
    theirs = run_mergekit(yaml.safe_dump(exported), tmp_path / "mk", lora_cache)
    base = T.load_state(qwen.base)
    assert set(ours) == set(theirs) == set(base)
    assert (
        {t.dtype for t in ours.values()} == {t.dtype for t in theirs.values()} == {torch.bfloat16}
    )

    def config(folder):
        return json.loads((folder / "config.json").read_text())

    assert config(tmp_path / "ours")["dtype"] == config(tmp_path / "mk")["dtype"] == "bfloat16"

    # The computation: the same recipe stored in float32, by both tools.
    ours32 = run_native({**doc, "out_dtype": "float32"}, tmp_path / "ours32")
    theirs32 = run_mergekit(
        yaml.safe_dump({**exported, "out_dtype": "float32"}), tmp_path / "mk32", lora_cache
    )
    worst, flips, total = compare(ours32, theirs32, sorted(base))
    if trimming:
        assert flips <= FLIP_BUDGET * total, (worst, flips, total)
    else:
        assert flips == 0 and worst < TOL, (worst, flips, total)
    # Each bf16 output is that float32 result rounded once (no bf16 arithmetic on either side).
    for key in base:
        assert torch.equal(ours[key], ours32[key].to(torch.bfloat16)), key
        assert torch.equal(theirs[key], theirs32[key].to(torch.bfloat16)), key
    # So the bf16 outputs differ only where the rounding of nearly equal float32 values flips
    # (one bf16 ulp), plus TIES's trim flips.
    differ = within_ulp = 0
    for key in base:
        d = (ours[key].double() - theirs[key].double()).abs()
        differ += int((d > 0).sum())
        close32 = (ours32[key].double() - theirs32[key].double()).abs() <= TOL
        within_ulp += int(((d <= bf16_ulp(ours32[key]) * 1.01) | ~close32).sum())
    assert within_ulp == total
    assert differ <= FLIP_BUDGET * total, (differ, total)


def test_mergekit_yaml_with_out_dtype_runs_the_same_in_both(qwen, lora_cache, tmp_path):
    """Direction 2: a YAML as a mergekit user writes it, run by emomerge natively and mergekit."""
    per = {"weight": WEIGHTS, "density": [0.6, 0.6, 0.6]}
    doc = {
        "merge_method": "ties",
        "base_model": str(qwen.base),
        "models": [
            {"model": f"{qwen.base}+{a}", "parameters": {k: v[i] for k, v in per.items()}}
            for i, a in enumerate(qwen.adapters)
        ],
        "parameters": {"lambda": 1.0, "normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    ours = run_native({**doc, "emomerge": {"output": "full"}}, tmp_path / "ours")
    theirs = run_mergekit(yaml.safe_dump(doc), tmp_path / "mk", lora_cache)
    base = T.load_state(qwen.base)
    assert (
        {t.dtype for t in ours.values()} == {t.dtype for t in theirs.values()} == {torch.bfloat16}
    )
    worst, flips, total = compare(ours, theirs, sorted(base))
    assert flips <= FLIP_BUDGET * total, (worst, flips, total)
    touched = {qwen.base_key(p) for p in T.dense_updates(qwen.adapters[0])}
    assert max(float((ours[k].float() - base[k]).abs().max()) for k in touched) > 0.05  # it merged


def test_the_old_bf16_export_computes_something_else(qwen, lora_cache, tmp_path):
    """What the export used to write (``dtype: bfloat16``): mergekit then merges in bf16 and
    disagrees with the float32 computation far beyond rounding flips — what the rule fixes."""
    method, per, glob, _ = CASES["task_arithmetic"]
    doc = recipe_doc(qwen, method, per, glob, dtype="bfloat16")
    exported = yaml.safe_load(
        export_mergekit(Recipe.model_validate(doc), base_model=str(qwen.base), root=tmp_path)
    )
    old = {k: v for k, v in exported.items() if k != "out_dtype"} | {"dtype": "bfloat16"}
    ours = run_native(doc, tmp_path / "ours")
    theirs = run_mergekit(yaml.safe_dump(old), tmp_path / "mk_old", lora_cache)
    touched = sorted(qwen.base_key(p) for p in T.dense_updates(qwen.adapters[0]))
    differ = sum(int((ours[k] != theirs[k]).sum()) for k in touched)
    total = sum(ours[k].numel() for k in touched)
    assert differ > 10 * FLIP_BUDGET * total, (differ, total)


def test_export_names_the_local_base_dtype_when_the_recipe_names_none(qwen, tmp_path):
    doc = recipe_doc(qwen, "linear", {"weight": WEIGHTS}, {})
    exported = yaml.safe_load(
        export_mergekit(Recipe.model_validate(doc), base_model=str(qwen.base), root=tmp_path)
    )
    # the tiny base is float32: mergekit computes and stores float32, as our full output does
    assert (exported["dtype"], exported["out_dtype"]) == ("float32", "float32")
    hub = yaml.safe_load(
        export_mergekit(
            Recipe.model_validate(doc),
            base_model="Qwen/Qwen2.5-VL-7B-Instruct",
            root=tmp_path,
            reference_check=False,
        )
    )
    assert hub["dtype"] == "float32" and "out_dtype" not in hub
