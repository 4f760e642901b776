"""Data-parallel evaluation: ``accelerate launch`` with two CPU processes (gloo) gives the same
leaderboard as one process, and a re-run after a lost part resumes from the cache.

``--multi_gpu`` selects accelerate's torch.distributed launcher; without GPUs the processes join
a gloo group (as in tests/training/test_accelerate.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emomerge.evaluation.distributed import Shard
from emomerge.evaluation.leaderboard import read_rows

VOLATILE = ("date", "git_hash", "versions", "git_dirty")  # when, and with what software


class S:
    def __init__(self, i, group):
        self.id, self.group = f"s{i}", group


def test_shards_deal_whole_groups():
    samples = [S(i, f"p{i // 3}") for i in range(20)]  # 7 pages of up to 3 utterances
    parts = [Shard(r, 3).take(samples) for r in range(3)]
    assert sorted(s.id for p in parts for s in p) == sorted(s.id for s in samples)
    for r, part in enumerate(parts):  # page k goes to process k mod 3, whole
        assert {s.group for s in part} == {f"p{k}" for k in range(7) if k % 3 == r}
    assert Shard().take(samples) == samples


def _evaluate(args, out, processes):
    script = shutil.which("emomerge") or str(Path(sys.executable).parent / "emomerge")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = (
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            script,
        ]
        if processes > 1
        else [script]
    )
    proc = subprocess.run(
        [*launch, "evaluate", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rows →") == 1  # only the main process reports
    return [
        {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_rows(out / "leaderboard.csv")
    ]


@pytest.mark.slow
def test_two_processes_give_the_one_process_leaderboard(
    tiny_base, stage_dirs, merge_dirs, emocomics_dir, tmp_path
):
    args = [
        "--base",
        str(tiny_base),
        "--variants",
        str(stage_dirs[0].parent),
        *map(str, merge_dirs),
        "--dataset",
        "emocomics35",
        "--data",
        str(emocomics_dir),
        "--task",
        "utterance",
        "--n-boot",
        "50",
        "--batch-size",
        "2",
    ]
    one = _evaluate(args, tmp_path / "one", 1)
    two = _evaluate(args, tmp_path / "two", 2)
    assert [r["variant"] for r in two] == [r["variant"] for r in one]
    assert two == one  # every metric, interval, p-value and threshold
    parts = sorted((tmp_path / "two" / "predictions").glob("ties.*.part*.jsonl"))
    assert [p.name.rsplit(".", 2)[-2] for p in parts] == ["part0", "part1"]

    # process 1 "killed": its part lost but the first line; the re-run scores only the rest
    lines = parts[1].read_text().splitlines(keepends=True)
    parts[1].write_text(lines[0])
    again = _evaluate(args, tmp_path / "two", 2)
    assert again == one
    assert len(parts[1].read_text().splitlines()) == len(lines)
