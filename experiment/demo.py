"""The embedded demo: a tiny Qwen2.5-VL, the synthetic curriculum in the four datasets' real
formats, and the full experiment — offline, CPU only.

    emomerge demo            # ./emomerge-demo/: 4 stages, every recipe in merge_configs/,
                             # every variant scored on all four test splits
    emomerge demo --quick    # the CI variant: less data, fewer steps, 3 merges, 2 test splits

Every variant is scored on each dataset's own test split with that dataset's task: EmoArt
(single-label dominant emotion: accuracy, macro-F1 over its 12 labels), EMID (the single-label
emotion-matching answer), MangaVQA (generated answers: NFKC exact match, character F1) and
EmoComics35 (multi-label utterances), so the leaderboard shows what each stage and merge keeps
(forgetting) and gains (transfer) on every domain, against the last stage (the baseline).

The demo writes ``experiment.yaml`` into its folder, so ``emomerge run emomerge-demo/experiment.yaml
--out emomerge-demo`` reproduces (and resumes) it. Model and data are written to temporary
siblings and renamed into place, so a demo killed while writing them starts them over cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emomerge.merging.atomic import atomic_folder
from emomerge.merging.config import dump_yaml

from .config import MERGE_CONFIGS

FAMILY = "qwen2_5_vl"
STAGES = (
    ("emoart", "emoart", "dominant_emotion"),
    ("emid", "emid", "matching"),
    ("mangavqa", "mangavqa", None),
    ("emocomics35", "emocomics35", "utterance"),
)
#: The quick variant's merges (one exact low-rank, one sparse + re-factorised, one SVD-based).
QUICK_MERGES = ("linear", "ties", "tsv")
#: The quick variant's evaluation sets: the target, and the first stage (the one most exposed to
#: forgetting) as the single-label set.
QUICK_EVAL = ("emoart", "emocomics35")


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: items per synthetic dataset, steps per stage, evaluation."""

    items: dict[str, int]
    steps: int
    n_boot: int
    merges: tuple[str, ...] | None  # None: every recipe in merge_configs/
    merge_ablations: list[str] | bool
    eval_sets: tuple[str, ...] | None = None  # stages whose test split is scored; None: all


FULL = DemoSize(
    items={"emoart": 60, "emid": 40, "mangavqa": 40, "emocomics35": 64},
    steps=30,
    n_boot=1000,
    merges=None,
    merge_ablations=["linear", "ties"],
)
# EmoArt's test split is a 10 % hash of the records: 32 give 6 test items (24 gave 4).
QUICK = DemoSize(
    items={"emoart": 32, "emid": 16, "mangavqa": 16, "emocomics35": 24},
    steps=4,
    n_boot=200,
    merges=QUICK_MERGES,
    merge_ablations=["ties"],
    eval_sets=QUICK_EVAL,
)


def _atomic(target: Path, build: Any) -> Path:
    """Build into a temporary sibling, then rename: a half-written folder is never reused."""
    if target.is_dir():
        return target
    with atomic_folder(target) as tmp:
        build(tmp)
    return target


def eval_sets(size: DemoSize) -> list[dict[str, Any]]:
    """Each selected stage's test split, read with the stage's own task (curriculum order).

    The readers pick the metrics from the dataset: EmoArt and EMID single-label, MangaVQA
    generated answers, EmoComics35 multi-label (threshold chosen on its held-out train books).
    """
    sets = []
    for name, dataset, task in STAGES:
        if size.eval_sets is not None and name not in size.eval_sets:
            continue
        s: dict[str, Any] = {
            "name": name,
            "dataset": dataset,
            "path": f"data/{name}",
            "split": "test",
        }
        if task:
            s["task"] = task
        sets.append(s)
    return sets


def demo_experiment(size: DemoSize) -> dict[str, Any]:
    """The demo's experiment mapping (paths relative to the demo folder)."""
    if not MERGE_CONFIGS.is_dir():
        from emomerge.merging.errors import InputError

        raise InputError(
            f"{MERGE_CONFIGS}: merge_configs/ not found (install from a checkout: pip install -e .)"
        )
    recipes = sorted(p.stem for p in MERGE_CONFIGS.glob("*.yaml"))
    if size.merges is not None:
        recipes = [r for r in recipes if r in size.merges]
    stages = []
    for name, dataset, task in STAGES:
        stage: dict[str, Any] = {
            "name": name,
            "dataset": dataset,
            "path": f"data/{name}",
            "steps": size.steps,
        }
        if task:
            stage["task"] = task
        if dataset == "emocomics35":  # books for the multi-label threshold, kept out of training
            stage["holdout"] = {"fraction": 0.1, "seed": 0}
        stages.append(stage)
    return {
        "name": "demo-quick" if size is QUICK else "demo",
        "architectures": [
            {"name": "tiny-qwen2_5_vl", "model": f"model/tiny-{FAMILY}", "family": FAMILY}
        ],
        "curriculum": {
            "lineage": "continued",
            # A tiny random model needs large steps to move at all in a few dozen updates.
            "lora": {"r": 8, "alpha": 16},
            "train": {"batch_size": 4, "lr": 3.0e-2},
            "stages": stages,
        },
        "merges": [str(MERGE_CONFIGS / f"{r}.yaml") for r in recipes],
        "evaluation": {
            "sets": eval_sets(size),
            "baseline": "last_stage",
            "n_boot": size.n_boot,
        },
        "ablations": {
            "single_stage": True,
            "chain_without_stage": True,
            "merge_without_stage": size.merge_ablations,
        },
        "seeds": [0],
        # 1 intra-op thread: tiny models are all overhead, measured faster than 2 on 2 cores.
        "threads": 1,
        "device": "cpu",
    }


def prepare_demo(out: str | Path, quick: bool = False) -> Path:
    """Write the tiny model, the synthetic data and ``experiment.yaml`` under ``out``."""
    from emomerge.training.data.synthetic import write_synthetic
    from emomerge.training.models.tiny import build_tiny_vlm

    out = Path(out).resolve()
    size = QUICK if quick else FULL
    model = out / "model" / f"tiny-{FAMILY}"
    if not (model / "config.json").is_file():  # build_tiny_vlm renames a complete folder in
        build_tiny_vlm(FAMILY, model, seed=0)
    for name, dataset, _ in STAGES:
        _atomic(
            out / "data" / name,
            lambda tmp, d=dataset: write_synthetic(d, tmp, n=size.items[d], seed=0),
        )
    path = out / "experiment.yaml"
    text = (
        "# The emomerge demo (written by `emomerge demo`); re-run or resume with\n"
        f"#   emomerge run {path} --out {out}\n" + dump_yaml(demo_experiment(size))
    )
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def run_demo(
    out: str | Path = "emomerge-demo",
    *,
    quick: bool = False,
    progress: bool = False,
    echo: Any = print,
) -> Any:
    """Prepare and run the demo; return the :class:`ExperimentResult`."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .run import run_experiment

    path = prepare_demo(out, quick)
    echo(f"[demo] {'quick ' if quick else ''}experiment {path}")
    return run_experiment(path, Path(out), progress=progress, echo=echo)
