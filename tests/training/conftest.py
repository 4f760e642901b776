"""Shared fixtures: tiny models and synthetic datasets built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach a hub from the tests (everything here is local).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "mllama", "llava", "llava_next", "pixtral"]
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


class TinyModels:
    """Build each family's tiny model on first use, once per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, family: str) -> Path:
        if family not in self._built:
            from emomerge.training.models.tiny import build_tiny_vlm

            self._built[family] = build_tiny_vlm(family, self.root / family, seed=0)
        return self._built[family]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModels:
    """``tiny_model("llava")`` → path of a tiny LLaVA checkpoint (built once)."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """The four synthetic datasets (seed 0), written once in their published formats."""
    from emomerge.training.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    return {
        name: write_synthetic(name, root / name, n=24, seed=0)
        for name in ("emocomics35", "emoart", "emid", "mangavqa")
    }


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo root>/../shared/data`` (the real-format files), or skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: the real-format data lives outside the repo")
    return SHARED_DATA
