"""The output rank and vLLM's --max-lora-rank on every merge summary and in inspect; outputs
fsynced before they become visible."""

from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import atomic
from emomerge.merging.serving import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

from .helpers import lm_modules, write_adapter

SHAPES = lm_modules(layers=1, hidden=32, inter=40)


def run(*args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def stored_rank(folder) -> int:
    """The largest rank in a written adapter, read from its lora_A shapes."""
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        return max(fh.get_slice(k).get_shape()[0] for k in fh.keys() if k.endswith("lora_A.weight"))  # noqa: SIM118


@pytest.mark.parametrize(
    "rank,needed",
    [
        (1, 1),
        (8, 8),
        (16, 16),
        (17, 32),
        (24, 32),
        (33, 64),
        (129, 256),
        (300, 320),
        (512, 512),
        (513, None),
    ],
)
def test_smallest_accepted_max_lora_rank(rank, needed):
    assert vllm_max_lora_rank(rank) == needed
    if needed is not None:  # the smallest value of vLLM's list that holds the rank
        assert needed == min(v for v in VLLM_MAX_LORA_RANKS if v >= rank)


@pytest.fixture()
def three(tmp_path):
    for i in (1, 2, 3):
        write_adapter(tmp_path / f"a{i}", SHAPES, r=8, alpha=16, seed=i)
    return tmp_path


def test_exact_merge_summary_names_rank_and_vllm_flag(three):
    out = three / "ta"
    result = run(
        "task-arithmetic", "--adapters", three / "a1", three / "a2", three / "a3", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert stored_rank(out) == 24  # 3 × 8, concatenated factors
    assert ", rank 24; vLLM needs --max-lora-rank 32" in result.stdout
    manifest = json.loads((out / "emomerge.json").read_text())
    assert manifest["output_rank_max"] == 24 and manifest["vllm_max_lora_rank"] == 32


def test_small_rank_summary_has_no_vllm_flag(three):
    out = three / "ties"
    result = run("ties", "--adapters", three / "a1", three / "a2", "--density", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert stored_rank(out) == 8
    assert ", rank 8" in result.stdout and "max-lora-rank" not in result.stdout


def test_inspect_prints_the_output_ranks(three):
    args = [three / "a1", three / "a2", three / "a3"]
    report = json.loads(run("inspect", *args, "--json").stdout)
    assert report["output_rank"] == {
        "exact_linear": 24,
        "sparse_default": 8,
        "vllm_max_lora_rank": {"exact_linear": 32, "sparse_default": 8},
    }
    text = " ".join(run("inspect", *args).stdout.split())  # the terminal table may wrap lines
    assert "linear / task arithmetic (exact): rank 24 (vLLM needs --max-lora-rank 32)" in text
    # The reported exact rank is the rank a linear merge writes.
    assert run("linear", "--adapters", *args, "--out", three / "lin").exit_code == 0
    assert stored_rank(three / "lin") == report["output_rank"]["exact_linear"]


def test_outputs_are_fsynced_before_the_rename(three, monkeypatch):
    """Every file of the output and the temporary folder are fsynced before it is renamed to
    --out, the parent directory after; one fsync per file."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "rename", rename)
    out = three / "merged"
    assert run("linear", "--adapters", three / "a1", three / "a2", "--out", out).exit_code == 0
    place = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    tmp = events[place][1]
    synced_before = [e[1] for e in events[:place] if e[0] == "fsync"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "emomerge.json"]
    assert sorted(os.path.basename(p) for p in synced_before if os.path.dirname(p) == tmp) == files
    assert synced_before[-1] == tmp  # the folder after its files
    assert ("fsync", str(three)) in events[place:]  # the parent after the rename
    assert len(synced_before) == len(files) + 1


def test_exported_yaml_is_fsynced(three, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        atomic.os,
        "fsync",
        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1],
    )
    out = three / "x.yaml"
    result = run(
        "export-mergekit",
        "--method",
        "linear",
        "--adapters",
        three / "a1",
        three / "a2",
        "--base",
        "org/base",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert (
        synced[-1] == str(three) and len(synced) == 2
    )  # the file (under its temporary name), the folder
