"""The same `emomerge train` under `accelerate launch` with two CPU processes (gloo), two stages.

``--multi_gpu`` selects accelerate's torch.distributed launcher; on a machine without GPUs the
processes join a gloo group. (``--cpu --num_processes 2`` would silently run ONE process: for
CPU, accelerate's multi-process path needs an MPI hostfile.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from emomerge.merging.lineage import read_stage_metadata

pytestmark = pytest.mark.slow  # two real processes under accelerate


def test_two_process_cpu_run(tmp_path, tiny_model, synthetic):
    # The console script is what users launch: `accelerate launch $(which emomerge) train ...`.
    script = shutil.which("emomerge") or str(Path(sys.executable).parent / "emomerge")
    cur = tmp_path / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model("qwen2_5_vl")),
                "lineage": "stacked",
                "lora": {"r": 2, "alpha": 4},
                "train": {"batch_size": 2, "lr": 5e-3},
                "stages": [
                    {
                        "name": "ec",
                        "dataset": "emocomics35",
                        "path": str(synthetic["emocomics35"]),
                        "steps": 2,
                        "max_samples": 8,
                    },
                    # a second stage: stage 1 folded into the base on both processes, then trained
                    {
                        "name": "emid",
                        "dataset": "emid",
                        "path": str(synthetic["emid"]),
                        "task": "matching",
                        "steps": 2,
                        "max_samples": 8,
                    },
                ],
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            script,
            "train",
            str(cur),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = tmp_path / "run" / "adapters"
    for name, parent in (("ec", None), ("emid", "../ec")):
        meta = read_stage_metadata(adapters / name)
        assert meta.world_size == 2 and meta.steps == 2 and meta.lineage.mode == "stacked"
        assert meta.lineage.parent == parent
        weights = adapters / name / "adapter_model.safetensors"
        assert all(".language_model." in k for k in load_file(weights))
    assert (
        read_stage_metadata(adapters / "emid").lineage.parent_sha256
        == hashlib.sha256((adapters / "ec" / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert not list(adapters.glob(".*"))
