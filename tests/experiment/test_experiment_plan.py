"""``emomerge run --plan``: counts written out by hand for the quick demo's experiment."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.experiment.config import load_experiment
from emomerge.experiment.demo import prepare_demo
from emomerge.experiment.plan import plan_experiment


def test_plan_counts_the_quick_demo(tmp_path):
    path = prepare_demo(tmp_path / "demo", quick=True)
    plan = plan_experiment(load_experiment(path), seconds_per_example=2.0)
    # chains: main, single-stage, and the chain without each of the 3 auxiliary stages
    assert plan.chains == [
        "main",
        "single-stage",
        "without-emoart",
        "without-emid",
        "without-mangavqa",
    ]
    # distinct stage prefixes: main 4; single-stage 1; without-emoart 3 (emid first);
    # without-emid 2 (emoart is main's); without-mangavqa 1 (emoart, emid are main's)
    assert plan.stages == 4 + 1 + 3 + 2 + 1
    # quick merges linear, ties, tsv; only ties is ablated, over its 4 input stages
    assert (plan.merges, plan.merge_ablations) == (3, 4)
    # base + single-stage + 4 stages + 3 merges, then 3 chain and 4 merge ablations
    sets = {s.name: s for s in plan.sets}
    assert {n: s.variants for n, s in sets.items()} == {"emoart": 16, "emocomics35": 16}
    from emomerge.evaluation.pipeline import load_split

    test = load_split(
        "emocomics35", tmp_path / "demo" / "data" / "emocomics35", "test", "utterance"
    )
    assert sets["emocomics35"].examples == len(test) and sets["emocomics35"].validation > 0
    assert sets["emoart"].validation == 0  # single-label: no threshold to choose
    total = sum(s.variants * (s.examples + s.validation) for s in plan.sets)
    assert plan.examples() == total
    assert f"{total * 2.0 / 3600:,.1f} GPU-hours" in plan.table()


def test_ablations_can_be_kept_to_the_target_set(tmp_path):
    path = prepare_demo(tmp_path / "demo", quick=True)
    raw = yaml.safe_load(path.read_text())
    raw["ablations"]["evaluation_sets"] = ["emocomics35"]
    path.write_text(yaml.safe_dump(raw))
    plan = plan_experiment(load_experiment(path))
    assert {s.name: s.variants for s in plan.sets} == {"emoart": 9, "emocomics35": 16}
    raw["ablations"]["evaluation_sets"] = ["emocomic35"]
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["run", str(path), "--plan"])
    assert res.exit_code == 2 and "emocomic35" in res.output


def test_cli_plan_runs_nothing(tmp_path):
    path = prepare_demo(tmp_path / "demo", quick=True)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(path), "--plan", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| emocomics35 | 16 |" in res.output and "GPU-hours" in res.output
    assert not out.exists()
