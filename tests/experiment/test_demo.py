"""The quick demo end to end, in a real subprocess killed mid-run and resumed; then an edited
recipe recomputes only its merge and its scores. The full demo's evaluation sets: every dataset's
test split, read and kept apart from training."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # the demo killed and resumed in real subprocesses (~40 s)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "emomerge.cli_run", "demo", "--quick", "--out", str(out)]


def _finished(out: Path) -> dict[Path, tuple[str, int]]:
    """Every finished (non-linked) stage adapter: weights sha256 and mtime. A killed writer's
    temporary folder (`.NAME.tmp-...`, never renamed into place) is not a finished stage."""
    found = {}
    for meta in out.glob("train/*/seed*/*/adapters/*/emomerge.json"):
        folder = meta.parent
        if folder.is_symlink() or folder.name.startswith("."):
            continue
        weights = folder / "adapter_model.safetensors"
        found[weights] = (
            hashlib.sha256(weights.read_bytes()).hexdigest(),
            weights.stat().st_mtime_ns,
        )
    return found


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "emomerge-demo"
    proc = subprocess.Popen(
        _cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.monotonic() + 180
    try:
        # kill once two stages of the main chain are on disk (the run is mid-chain)
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_finished(out)) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the demo ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _finished(out)
    assert len(before) >= 2
    assert not (out / "leaderboard.csv").exists()
    start = time.perf_counter()
    res = subprocess.run(
        _cmd(out), capture_output=True, text=True, env=ENV, timeout=600, check=False
    )
    seconds = time.perf_counter() - start
    return out, before, res, seconds


def test_resumed_demo_completes_and_prints_the_leaderboard(killed_then_resumed):
    out, _, res, _ = killed_then_resumed
    assert res.returncode == 0, res.stderr[-3000:]
    table = (out / "leaderboard.md").read_text()
    assert table.split("\n", 2)[2].strip() in res.stdout  # the printed table is the file's
    for name in ("leaderboard.csv", "leaderboard.md", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert f"plot:        {out.resolve() / 'plot.png'}" in res.stdout
    for variant in (
        "base",
        "single-stage",
        "emoart",
        "emid",
        "mangavqa",
        "emocomics35",
        "linear",
        "ties",
        "tsv",
        "chain-without-emoart",
        "chain-without-emid",
        "chain-without-mangavqa",
        "ties-without-emoart",
        "ties-without-emocomics35",
    ):
        assert f"| {variant} |" in res.stdout
    assert "macro-F1 [95% CI]" in res.stdout and "p vs emocomics35" in res.stdout


def test_quick_demo_scores_its_two_datasets(killed_then_resumed):
    from emomerge.evaluation.leaderboard import read_rows

    out, _, res, _ = killed_then_resumed
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(out / "leaderboard.csv")
    variants: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:  # constant predictors (kind trivial, where the runner adds them) aside
        if r["kind"] != "trivial":
            variants.setdefault((r["dataset"], r["task"], r["n"]), set()).add(r["variant"])
    # EmoArt's 6 test items (single-label), EmoComics35's 19 test utterances (multi-label)
    assert set(variants) == {("emoart", "single", "6"), ("emocomics35", "multi", "19")}
    # every model variant scored on both
    assert variants[("emoart", "single", "6")] == variants[("emocomics35", "multi", "19")]
    assert len(variants[("emoart", "single", "6")]) == 16
    assert {r["baseline"] for r in rows} == {"emocomics35"}
    emoart = [r for r in rows if r["dataset"] == "emoart"]
    assert all(r["accuracy"] and r["macro_f1"] and not r["example_f1"] for r in emoart)
    # the grid: one column per dataset, before the per-set tables
    grid = (
        "| variant | kind | method | emoart/test macro-F1 [95% CI] "
        "| emocomics35/test macro-F1 [95% CI] |"
    )
    assert grid in res.stdout
    assert res.stdout.index(grid) < res.stdout.index("### tiny-qwen2_5_vl — emoart/test")
    assert "n = 19 utterances on 6 pages" in res.stdout


def test_full_demo_scores_every_test_split(tmp_path):
    """The full demo's four evaluation sets read their test splits with their own task, and the
    chain's stages (the overlap guard) accept them."""
    from emomerge.evaluation.runner import TASK_OF_DATASET
    from emomerge.experiment.config import parse_experiment
    from emomerge.experiment.demo import FULL, QUICK, STAGES, demo_experiment
    from emomerge.experiment.run import curriculum_of
    from emomerge.training.curriculum import parse_curriculum
    from emomerge.training.data import read_dataset
    from emomerge.training.data.emoart import LABELS as EMOART_LABELS
    from emomerge.training.data.synthetic import write_synthetic
    from emomerge.training.stages import plan_stages

    for name, dataset, _ in STAGES:
        write_synthetic(dataset, tmp_path / "data" / name, n=FULL.items[dataset], seed=0)
    exp = parse_experiment(demo_experiment(FULL), tmp_path / "experiment.yaml")
    sets = exp.spec.evaluation.sets
    assert [(s.label, s.split, s.task) for s in sets] == [
        ("emoart", "test", "dominant_emotion"),
        ("emid", "test", "matching"),
        ("mangavqa", "test", None),
        ("emocomics35", "test", "utterance"),
    ]
    assert exp.spec.evaluation.baseline == "last_stage"
    found = {}
    for s in sets:
        samples = read_dataset(s.dataset, s.path, s.split, s.task, **s.options)
        found[s.dataset] = (TASK_OF_DATASET[s.dataset], len(samples), samples[0].label_set)
    assert found == {
        "emoart": ("single", 10, EMOART_LABELS),
        "emid": ("single", 13, ["yes", "no"]),
        "mangavqa": ("vqa", 13, []),
        "emocomics35": ("multi", 47, found["emocomics35"][2]),
    }
    assert len(found["emocomics35"][2]) == 7
    # training reads each stage's test split and refuses any overlap with its train split
    cur = curriculum_of(exp, exp.spec.architectures[0], "model", 0, exp.stages)
    plans = plan_stages(parse_curriculum(cur, "<demo>"), tmp_path / "scratch")
    assert [p.stage.name for p in plans] == [name for name, _, _ in STAGES]
    quick = demo_experiment(QUICK)["evaluation"]["sets"]
    assert [s["dataset"] for s in quick] == ["emoart", "emocomics35"]


def test_finished_stages_are_not_redone(killed_then_resumed):
    out, before, res, _ = killed_then_resumed
    after = _finished(out)
    for weights, (sha, mtime) in before.items():
        assert after[weights] == (sha, mtime), f"{weights} was rewritten"
    # the killed run's temporary folders are swept, not left beside the finished ones
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a killed writer's temp is left"
    main_line = next(
        ln for ln in res.stdout.splitlines() if ln.startswith("[train]") and " main:" in ln
    )
    assert "emoart" not in main_line.split("trained", 1)[-1]  # the first stage was reused


def test_an_edited_recipe_recomputes_only_its_merge_and_scores(killed_then_resumed, tmp_path):
    from emomerge.experiment.config import MERGE_CONFIGS
    from emomerge.experiment.run import run_experiment

    out, _, res, _ = killed_then_resumed
    assert res.returncode == 0
    exp = yaml.safe_load((out / "experiment.yaml").read_text())
    ties = yaml.safe_load((MERGE_CONFIGS / "ties.yaml").read_text())
    ties["models"][0]["parameters"]["density"] = 0.3  # the one edit
    edited = tmp_path / "ties.yaml"
    edited.write_text(yaml.safe_dump(ties))
    exp["merges"] = [str(edited) if Path(m).stem == "ties" else m for m in exp["merges"]]
    path = out / "experiment-edited.yaml"  # next to the original: same relative model/data
    path.write_text(yaml.safe_dump(exp))
    merges = {p: p.stat().st_mtime_ns for p in out.glob("merges/*/seed0/*/emomerge.json")}
    preds = {p: p.stat().st_mtime_ns for p in out.glob("eval/*/seed0/*/predictions/*.jsonl")}

    result = run_experiment(path, out, progress=False, echo=lambda s: None)
    assert result.built["stages"] == []
    assert [b.rsplit("/", 1)[-1] for b in result.built["merges"]] == ["ties"]
    scored = sorted(b.rsplit(":", 1)[-1] for b in result.built["scored"])
    # the edited merge is scored again; its leave-one-stage-out merges are rebuilt and scored
    # unless their weights come out byte-identical (without emoart: the edit is dropped)
    assert "ties" in scored and all(s == "ties" or s.startswith("ties-without-") for s in scored)
    assert "ties-without-emid" in scored
    for p, mtime in merges.items():  # linear, tsv and the old ties untouched
        assert p.stat().st_mtime_ns == mtime
    for p, mtime in preds.items():  # no cached prediction file was appended to
        assert p.stat().st_mtime_ns == mtime
