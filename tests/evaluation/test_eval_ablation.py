"""Leave-one-stage-out merges are reused only when their whole recipe is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from emomerge.evaluation.ablation import leave_one_stage_out
from emomerge.evaluation.variants import variant_from_dir


def _stamps(folders: list[Path]) -> dict[str, int]:
    return {f"{d.name}/{f.name}": f.stat().st_mtime_ns for d in folders for f in d.iterdir()}


def test_same_names_changed_params_rebuild_unchanged_reuse(stage_dirs, tmp_path):
    from emomerge.merging import merge

    first = merge("ties", stage_dirs, tmp_path / "a" / "ties", params={"density": 0.5}, rank=4)
    v1 = variant_from_dir(Path(getattr(first, "out", first)))
    built = leave_one_stage_out(v1, tmp_path / "abl")
    folders = [v.path for v in built]
    assert [f.name for f in folders] == ["ties-without-emoart", "ties-without-emocomics35"]
    before = _stamps(folders)

    # the same merge again: every ablation is reused, no file rewritten
    again = leave_one_stage_out(v1, tmp_path / "abl")
    assert [v.path for v in again] == folders
    assert _stamps(folders) == before

    # a merge with the same name and inputs but another density: rebuilt
    second = merge("ties", stage_dirs, tmp_path / "b" / "ties", params={"density": 0.9}, rank=4)
    v2 = variant_from_dir(Path(getattr(second, "out", second)))
    assert v2.name == v1.name
    rebuilt = leave_one_stage_out(v2, tmp_path / "abl")
    assert [v.path for v in rebuilt] == folders
    after = _stamps(folders)
    assert all(after[k] != before[k] for k in before if k.endswith("emomerge.json"))
    for f in folders:
        assert json.loads((f / "emomerge.json").read_text())["params_given"]["density"] == 0.9


def test_ablation_keeps_the_merges_refactor_and_precision(stage_dirs, tmp_path):
    """A leave-one-stage-out row differs from its merge by the stage only: --refactor best, the
    compute dtype and the stored dtype come from the merge's manifest."""
    import torch
    from safetensors.torch import load_file

    from emomerge.merging import merge

    settings = {"rank": 2, "refactor": "best", "dtype": "float64", "out_dtype": "float64"}
    first = merge("ties", stage_dirs, tmp_path / "m" / "ties", params={"density": 0.5}, **settings)
    (abl,) = [
        v
        for v in leave_one_stage_out(variant_from_dir(Path(first.out)), tmp_path / "abl")
        if v.path.name.endswith("without-emoart")
    ]
    made = json.loads((abl.path / "emomerge.json").read_text())
    assert (made["refactor_choice"], made["dtype"], made["out_dtype"]) == (
        "best",
        "float64",
        "float64",
    )
    direct = merge("ties", stage_dirs[1:], tmp_path / "direct", params={"density": 0.5}, **settings)
    a = load_file(str(abl.path / "adapter_model.safetensors"))
    b = load_file(str(Path(direct.out) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float64 and torch.equal(a[k], b[k]) for k in a)
    # and a changed setting alone rebuilds it
    again = merge("ties", stage_dirs, tmp_path / "m2" / "ties", params={"density": 0.5}, rank=2)
    (plain,) = [
        v
        for v in leave_one_stage_out(variant_from_dir(Path(again.out)), tmp_path / "abl")
        if v.path.name.endswith("without-emoart")
    ]
    redone = json.loads((plain.path / "emomerge.json").read_text())
    assert (redone["refactor_choice"], redone["dtype"]) == ("projection", "float32")
