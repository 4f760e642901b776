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
