"""Session fixtures: one tiny Qwen2.5-VL, two stage adapters, two merges, two synthetic datasets.

Everything is built once per test session (seconds) and shared read-only; tests that write
results use their own tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILY = "qwen2_5_vl"


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models are all overhead: with other jobs on the 2 cores, one intra-op thread is ~6x
    faster than two (measured 73 ms vs 470 ms per scored sample). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from emomerge.training.models.tiny import build_tiny_vlm

    return build_tiny_vlm(FAMILY, tmp_path_factory.mktemp("base") / "tiny-qwen2_5_vl", seed=0)


def _stage_adapter(
    base: Path, out: Path, *, seed: int, stage: str, index: int, parent: str | None
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from emomerge.merging.lineage import BaseIdentity, Lineage, StageMetadata, write_stage_metadata
    from emomerge.training.models.families import LM_ONLY_REGEX

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    # init_lora_weights=False: B is random too, so each adapter really changes the outputs
    # (a freshly initialised LoRA has B = 0 and would equal the base).
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LM_ONLY_REGEX, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    write_stage_metadata(
        out,
        StageMetadata(
            stage=stage,
            stage_index=index,
            lineage=Lineage(mode="continued" if parent else None, parent=parent),
            base=BaseIdentity(name_or_path=str(base), family=FAMILY),
            seed=seed,
            steps=0,
        ),
    )
    return out


@pytest.fixture(scope="session")
def stage_dirs(tiny_base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    s1 = _stage_adapter(tiny_base, root / "s1_emoart", seed=1, stage="emoart", index=0, parent=None)
    s2 = _stage_adapter(
        tiny_base,
        root / "s2_emocomics35",
        seed=2,
        stage="emocomics35",
        index=1,
        parent="../s1_emoart",
    )
    return [s1, s2]


@pytest.fixture(scope="session")
def merge_dirs(stage_dirs, tmp_path_factory) -> list[Path]:
    from emomerge.merging import merge

    root = tmp_path_factory.mktemp("merges")
    lin = merge("linear", stage_dirs, root / "linear", weights=[0.5, 0.5])
    ties = merge("ties", stage_dirs, root / "ties", params={"density": 0.5}, rank=4)
    return [Path(getattr(r, "out", r)) for r in (lin, ties)]


@pytest.fixture(scope="session")
def host(tiny_base):
    from emomerge.evaluation.predict import ModelHost

    return ModelHost.load(tiny_base)


@pytest.fixture(scope="session")
def emocomics_dir(tmp_path_factory) -> Path:
    from emomerge.training.data.synthetic import write_synthetic

    return write_synthetic("emocomics35", tmp_path_factory.mktemp("ec35"), n=12, seed=0)


@pytest.fixture(scope="session")
def emoart_dir(tmp_path_factory) -> Path:
    from emomerge.training.data.synthetic import write_synthetic

    return write_synthetic("emoart", tmp_path_factory.mktemp("emoart"), n=50, seed=0)
