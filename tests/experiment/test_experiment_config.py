"""The experiment YAML: every error names the key (one line, exit 2); every shipped file loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emomerge.experiment.config import MERGE_CONFIGS, load_experiment
from emomerge.merging.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _good() -> dict:
    return {
        "name": "t",
        "architectures": ["model/tiny"],
        "curriculum": {
            "lineage": "continued",
            "lora": {"r": 4},
            "stages": [
                {"name": "emoart", "dataset": "emoart", "path": "data/emoart", "steps": 2},
                {
                    "name": "emocomics35",
                    "dataset": "emocomics35",
                    "path": "data/ec",
                    "task": "utterance",
                    "steps": 2,
                },
            ],
        },
        "merges": [
            {
                "name": "lin",
                "inline": {
                    "merge_method": "linear",
                    "models": [
                        {"model": "adapters/emoart", "parameters": {"weight": 0.5}},
                        {"model": "adapters/emocomics35", "parameters": {"weight": 0.5}},
                    ],
                },
            }
        ],
        "evaluation": {
            "sets": [{"dataset": "emocomics35", "path": "data/ec", "task": "utterance"}]
        },
        "seeds": [0, 1],
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_a_good_experiment_loads(tmp_path):
    exp = load_experiment(_write(tmp_path, _good()), inline_dir=tmp_path / "recipes")
    assert exp.stage_names == ["emoart", "emocomics35"]
    assert [m.name for m in exp.merges] == ["lin"]
    assert exp.stages[0]["path"] == str((tmp_path / "data" / "emoart").resolve())
    assert exp.spec.seeds == [0, 1] and exp.lineage == "continued"


def test_evaluation_set_scoring_keys(tmp_path):
    data = _good()
    exp = load_experiment(_write(tmp_path, data), inline_dir=tmp_path / "recipes")
    s = exp.spec.evaluation.sets[0]
    # defaults: label-set scoring up to 3 labels, summed log-probs
    assert (s.scoring, s.max_labels, s.length_norm) == ("auto", 3, False)
    assert s.append_eot is False
    data["evaluation"]["sets"][0].update(
        scoring="first_label", max_labels=2, length_norm=True, append_eot=True
    )
    exp = load_experiment(_write(tmp_path, data), inline_dir=tmp_path / "recipes")
    s = exp.spec.evaluation.sets[0]
    assert (s.scoring, s.max_labels, s.length_norm) == ("first_label", 2, True)
    # and they reach the evaluation's settings
    from emomerge.experiment.run import _eval_config

    cfg = _eval_config(exp, s, 0, "emocomics35")
    assert (cfg.scoring, cfg.max_labels, cfg.length_norm, cfg.append_eot) == (
        "first_label",
        2,
        True,
        True,
    )


@pytest.mark.parametrize(
    "dotted, value, key",
    [
        ("architectures", [], "architectures"),
        ("seeds", [1, 1], "seeds"),
        ("evaluation.n_boot", 3, "evaluation.n_boot"),
        ("evaluation.sets.0.dataset", "emocomics36", "evaluation.sets.0.dataset"),
        ("evaluation.baseline", "nope", "evaluation.baseline"),
        ("curriculum.stages.1.steps", 0, "curriculum.stages.1.steps"),
        ("curriculum.stages.0.dataset", "art", "curriculum.stages.0.dataset"),
        ("curriculum.lora", {"r": 0}, "curriculum.lora.r"),
        ("curriculum.lineage", "sideways", "curriculum.lineage"),
        ("ablations.merge_without_stage", ["ties"], "ablations.merge_without_stage"),
        ("merges.0.inline.merge_method", "tie", "merges.0.inline"),
        ("merges.0.inline.models.0.model", "adapters/emid", "merges.0.inline"),
        ("merges.0.name", "emoart", "merges"),
        ("merges.0", {"recipe": "no_such_recipe.yaml"}, "merges.0.recipe"),
        ("threads", 0, "threads"),
        ("evaluation.sets.0.scoring", "presence", "evaluation.sets.0.scoring"),
        ("evaluation.sets.0.max_labels", 0, "evaluation.sets.0.max_labels"),
        ("bogus", 1, "bogus"),
    ],
)
def test_errors_name_the_key(tmp_path, dotted, value, key):
    path = _write(tmp_path, _set(_good(), dotted, value))
    with pytest.raises(InputError) as err:
        load_experiment(path, inline_dir=tmp_path / "recipes")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: key '{key}")


def test_cli_bad_experiment_is_one_line_exit_2(tmp_path):
    import typer

    from emomerge import cli_run

    app = typer.Typer()
    cli_run.register(app)
    path = _write(tmp_path, _set(_good(), "evaluation.n_boot", 3))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "key 'evaluation.n_boot'" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_experiment_loads(path, tmp_path):
    text = path.read_text()
    assert text.startswith(f"# emomerge run experiments/{path.name}")
    exp = load_experiment(path, inline_dir=tmp_path)
    assert exp.stage_names == ["emoart", "emid", "mangavqa", "emocomics35"]
    assert sorted(m.name for m in exp.merges) == sorted(
        p.stem for p in MERGE_CONFIGS.glob("*.yaml")
    )
    assert len(exp.spec.seeds) >= 2 and exp.spec.evaluation.sets[0].dataset == "emocomics35"


def test_the_paper_families_are_covered():
    from emomerge.experiment.config import load_experiment as load

    families = {
        a.family for p in (REPO / "experiments").glob("*.yaml") for a in load(p).spec.architectures
    }
    assert families == {"qwen2_5_vl", "qwen3_vl", "mllama", "llava", "llava_next", "pixtral"}


def test_inline_recipes_without_a_folder_leave_nothing_behind(tmp_path):
    # loaded without inline_dir (as `emomerge run` without --out does to learn the name), the
    # inline recipes go to a temporary folder that exists while the process runs and is removed
    # when it exits
    import os
    import subprocess
    import sys

    path = _write(tmp_path, _good())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import sys; from emomerge.experiment.config import load_experiment; "
        "exp = load_experiment(sys.argv[1]); p = exp.merges[0].path; "
        "assert p.is_file() and p.parent.parent.name == 'tmp', p; print(p)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []
    # an experiment without inline recipes makes no folder at all
    no_inline = _good() | {"merges": []}
    load_experiment(_write(tmp_path, no_inline))


def test_an_unchanged_inline_recipe_is_not_rewritten(tmp_path):
    """Every process of a distributed run loads the experiment while the others read the
    recipes: an unchanged inline recipe keeps its file (same inode, same mtime); an edited one
    is replaced whole."""
    path = _write(tmp_path, _good())
    first = load_experiment(path, inline_dir=tmp_path / "recipes")
    recipe = next(m.path for m in first.merges if m.path.parent == tmp_path / "recipes")
    before = recipe.stat()
    load_experiment(path, inline_dir=tmp_path / "recipes")
    after = recipe.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    recipe.write_text("stale")
    load_experiment(path, inline_dir=tmp_path / "recipes")
    assert recipe.read_text() != "stale" and recipe.stat().st_ino != before.st_ino


def test_publish_text_sweeps_a_killed_writers_temporary_even_when_unchanged(tmp_path):
    """chain.json / inline recipes are rewritten only when they change; a temporary that a
    killed run left beside an unchanged file is still removed on the next run (nothing
    half-written stays on disk), while a live writer's is kept."""
    import os
    import subprocess
    import sys

    from emomerge.experiment.config import publish_text
    from emomerge.merging import atomic

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = tmp_path / "chain.json"
    publish_text(path, "{}\n")
    stale = tmp_path / f".chain.json.tmp-{atomic.HOST}-{proc.pid}-abcd.{atomic.BOOT}"
    stale.write_text("{")
    live = tmp_path / f".chain.json.tmp-{atomic.HOST}-{os.getppid()}-abcd.{atomic.BOOT}"
    live.write_text("{")
    before = path.stat().st_mtime_ns
    publish_text(path, "{}\n")
    assert path.stat().st_mtime_ns == before  # unchanged: not rewritten
    assert not stale.exists() and live.exists()
