"""The embedded demo: a tiny Qwen2.5-VL, the synthetic curriculum in the four datasets' real
formats, and the full experiment — offline, CPU only.

    emomerge demo            # ./emomerge-demo/: 4 stages, every recipe in merge_configs/
    emomerge demo --quick    # the CI variant: less data, fewer steps, 3 merges

The demo writes ``experiment.yaml`` into its folder, so ``emomerge run emomerge-demo/experiment.yaml
--out emomerge-demo`` reproduces (and resumes) it. Model and data are written to temporary
siblings and renamed into place, so a demo killed while writing them starts them over cleanly.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .experiment_config import MERGE_CONFIGS

FAMILY = "qwen2_5_vl"
STAGES = (("emoart", "emoart", "dominant_emotion"), ("emid", "emid", "matching"),
          ("mangavqa", "mangavqa", None), ("emocomics35", "emocomics35", "utterance"))
#: The quick variant's merges (one exact low-rank, one sparse + re-factorised, one SVD-based).
QUICK_MERGES = ("linear", "ties", "tsv")


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: items per synthetic dataset, steps per stage, evaluation."""

    items: dict[str, int]
    steps: int
    n_boot: int
    merges: tuple[str, ...] | None  # None: every recipe in merge_configs/
    merge_ablations: list[str] | bool


FULL = DemoSize(items={"emoart": 60, "emid": 40, "mangavqa": 40, "emocomics35": 64},
                steps=30, n_boot=1000, merges=None, merge_ablations=["linear", "ties"])
QUICK = DemoSize(items={"emoart": 24, "emid": 16, "mangavqa": 16, "emocomics35": 24},
                 steps=4, n_boot=200, merges=QUICK_MERGES, merge_ablations=["ties"])


def _atomic(target: Path, build: Any) -> Path:
    """Build into a temporary sibling, then rename: a half-written folder is never reused."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def demo_experiment(size: DemoSize) -> dict[str, Any]:
    """The demo's experiment mapping (paths relative to the demo folder)."""
    if not MERGE_CONFIGS.is_dir():
        from emomerge.merging.errors import InputError

        raise InputError(f"{MERGE_CONFIGS}: merge_configs/ not found (install from a checkout: "
                         "pip install -e .)")
    recipes = sorted(p.stem for p in MERGE_CONFIGS.glob("*.yaml"))
    if size.merges is not None:
        recipes = [r for r in recipes if r in size.merges]
    stages = []
    for name, dataset, task in STAGES:
        stage: dict[str, Any] = {"name": name, "dataset": dataset, "path": f"data/{name}",
                                 "steps": size.steps}
        if task:
            stage["task"] = task
        if dataset == "emocomics35":  # books for the multi-label threshold, kept out of training
            stage["holdout"] = {"fraction": 0.1, "seed": 0}
        stages.append(stage)
    return {
        "name": "demo-quick" if size is QUICK else "demo",
        "architectures": [{"name": "tiny-qwen2_5_vl", "model": f"model/tiny-{FAMILY}",
                           "family": FAMILY}],
        "curriculum": {
            "lineage": "continued",
            # A tiny random model needs large steps to move at all in a few dozen updates.
            "lora": {"r": 8, "alpha": 16},
            "train": {"batch_size": 4, "lr": 3.0e-2},
            "stages": stages,
        },
        "merges": [str(MERGE_CONFIGS / f"{r}.yaml") for r in recipes],
        "evaluation": {
            "sets": [{"name": "emocomics35", "dataset": "emocomics35",
                      "path": "data/emocomics35", "split": "test", "task": "utterance"}],
            "baseline": "last_stage",
            "n_boot": size.n_boot,
        },
        "ablations": {"single_stage": True, "chain_without_stage": True,
                      "merge_without_stage": size.merge_ablations},
        "seeds": [0],
        # 1 intra-op thread: tiny models are all overhead, measured faster than 2 on 2 cores.
        "threads": 1,
        "device": "cpu",
    }


def prepare_demo(out: str | Path, quick: bool = False) -> Path:
    """Write the tiny model, the synthetic data and ``experiment.yaml`` under ``out``."""
    from emomerge.training.data.synthetic import write_synthetic
    from emomerge.training.tiny import build_tiny_vlm

    out = Path(out).resolve()
    size = QUICK if quick else FULL
    model = out / "model" / f"tiny-{FAMILY}"
    if not (model / "config.json").is_file():  # build_tiny_vlm renames a complete folder in
        build_tiny_vlm(FAMILY, model, seed=0)
    for name, dataset, _ in STAGES:
        _atomic(out / "data" / name,
                lambda tmp, d=dataset: write_synthetic(d, tmp, n=size.items[d], seed=0))
    path = out / "experiment.yaml"
    text = ("# The emomerge demo (written by `emomerge demo`); re-run or resume with\n"
            f"#   emomerge run {path} --out {out}\n"
            + yaml.safe_dump(demo_experiment(size), sort_keys=False))
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def run_demo(out: str | Path = "emomerge-demo", *, quick: bool = False, progress: bool = False,
             echo: Any = print) -> Any:
    """Prepare and run the demo; return the :class:`ExperimentResult`."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .experiment import run_experiment

    path = prepare_demo(out, quick)
    echo(f"[demo] {'quick ' if quick else ''}experiment {path}")
    return run_experiment(path, Path(out), progress=progress, echo=echo)
