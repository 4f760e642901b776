"""The same inputs and seed give the same bytes: merges (adapter and full output, DARE's random
masks included) and leaderboards (every column but ``date``, ``git_hash`` and the software
provenance ``versions`` / ``git_dirty``).

Training's determinism (byte-identical adapters, also across a resume) is tested in
tests/training/test_train.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emomerge.merging import merge

from .merging.helpers import lm_modules, write_adapter, write_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHAPES = lm_modules(layers=2, hidden=16, inter=24)
#: Manifest fields that say when and where a merge ran, not what it computed.
WHEN_WHERE = ("created", "finished", "seconds", "elapsed", "host", "pid")
#: Manifest fields that say which software ran it (versions, git_dirty): not what it computed.
SOFTWARE = ("software",)
#: Leaderboard columns of when and with what software a row was made.
VOLATILE_COLUMNS = ("date", "git_hash", "versions", "git_dirty")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det")
    write_base(root / "base", SHAPES)
    for i, name in enumerate(("a", "b", "c")):
        write_adapter(root / name, SHAPES, seed=i + 1)
    return root


def _weights(folder: Path) -> dict[str, bytes]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {f.name: f.read_bytes() for f in files}


def _manifest(folder: Path) -> dict:
    raw = json.loads((folder / "emomerge.json").read_text())
    assert set(raw["software"]) >= {"python", "torch", "safetensors", "emomerge", "git_dirty"}
    return {k: v for k, v in raw.items() if k not in WHEN_WHERE + SOFTWARE}


@pytest.mark.parametrize(
    "method,params,output",
    [
        ("dare_ties", {"density": 0.5}, "adapter"),
        ("dare_ties", {"density": 0.5}, "full"),
        ("dare_linear", {"density": 0.3, "rescale": "density"}, "adapter"),
        ("della", {"density": 0.5, "epsilon": 0.2}, "full"),
        ("ties", {"density": 0.5}, "adapter"),
        ("task_arithmetic", {"lambda": 0.7}, "full"),
    ],
)
def test_same_seed_same_merge_bytes(inputs, tmp_path, method, params, output):
    adapters = [inputs / n for n in ("a", "b", "c")]
    base = inputs / "base" if output == "full" else None
    runs = [
        merge(
            method, adapters, tmp_path / f"run{i}", params=params, seed=7, output=output, base=base
        )
        for i in (1, 2)
    ]
    one, two = (Path(getattr(r, "out", tmp_path / f"run{i}")) for i, r in zip((1, 2), runs))
    assert _weights(one) == _weights(two)
    assert _manifest(one) == _manifest(two)
    if method.startswith(("dare", "della")):
        # the seed matters: another seed draws other masks, so other bytes
        other = tmp_path / "seed8"
        merge(method, adapters, other, params=params, seed=8, output=output, base=base)
        assert _weights(other) != _weights(one)


# ---------------------------------------------------------------- leaderboards


def _stage(base: Path, out: Path, seed: int, stage: str, index: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from emomerge.merging.lineage import BaseIdentity, StageMetadata, write_stage_metadata
    from emomerge.training.models.families import LM_ONLY_REGEX

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LM_ONLY_REGEX, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    write_stage_metadata(
        out,
        StageMetadata(
            stage=stage,
            stage_index=index,
            seed=seed,
            steps=0,
            base=BaseIdentity(name_or_path=str(base), family="qwen2_5_vl"),
        ),
    )
    return out


def test_same_variants_same_leaderboard(tmp_path):
    import torch

    from emomerge.evaluation.leaderboard import COLUMNS, read_rows
    from emomerge.evaluation.pipeline import evaluate_paths
    from emomerge.evaluation.runner import EvalConfig
    from emomerge.training.data.synthetic import write_synthetic
    from emomerge.training.models.tiny import build_tiny_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = build_tiny_vlm("qwen2_5_vl", tmp_path / "base", seed=0)
        s1 = _stage(base, tmp_path / "adapters" / "emoart", 1, "emoart", 0)
        s2 = _stage(base, tmp_path / "adapters" / "emid", 2, "emid", 1)
        # a DARE merge is scored exactly: recomputed from its inputs with its recorded seed
        dare = tmp_path / "merges" / "dare_ties"
        merge("dare_ties", [s1, s2], dare, params={"density": 0.5}, seed=3, rank=4)
        data = write_synthetic("emoart", tmp_path / "emoart", n=30, seed=0)
        results = []
        for run in ("one", "two"):
            cfg = EvalConfig(dataset="emoart", split="test", n_boot=50, seed=5)
            out = tmp_path / run
            evaluate_paths(base, [s1.parent, dare], data, out, cfg, progress=False)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    rows = [read_rows(r / "leaderboard.csv") for r in results]
    assert len(rows[0]) == len(rows[1]) == 5  # base, two stages, the merge, the trivial row
    assert [r["variant"] for r in rows[0]] == [
        "base",
        "emoart",
        "emid",
        "dare_ties",
        "trivial-majority",
    ]
    kept = [c for c in COLUMNS if c not in VOLATILE_COLUMNS]
    for a, b in zip(*rows):
        assert {c: a[c] for c in kept} == {c: b[c] for c in kept}
    # the rows are real numbers, not empty cells that would compare equal anyway
    assert all(r["macro_f1"] and r["macro_f1_lo"] for r in rows[0])
    assert rows[0][3]["representation"] == "exact" and rows[0][3]["method"] == "dare_ties"
    details = sorted(p.name for p in (results[0] / "details").iterdir())
    assert details == sorted(p.name for p in (results[1] / "details").iterdir())
