"""An experiment's ``lora`` / ``train`` overrides are typed (training/curriculum.py's
LoraOverrides / TrainOverrides): an unknown or mistyped key fails at load with its field path,
and a valid override reaches the stage settings exactly as the untyped mappings did."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emomerge.experiment.config import load_experiment
from emomerge.experiment.run import curriculum_of
from emomerge.merging.errors import InputError
from emomerge.training.curriculum import LoraSettings, TrainSettings, parse_curriculum

CURRICULUM = {
    "base_model": "unused/base",
    "lineage": "continued",
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
    "train": {"batch_size": 2, "lr": 1.0e-3, "max_pixels": 5000, "scheduler": "cosine"},
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
}


def _experiment(**over) -> dict:
    exp = {
        "name": "t",
        "architectures": [
            # "5e-5" is a string to YAML 1.1 (no dot): typed, it is the number it means
            {
                "model": "m/a",
                "name": "a",
                "lora": {"r": 16},
                "train": {"lr": "5e-5", "max_grad_norm": None, "max_pixels": None},
            },
            {"model": "m/b", "name": "b"},
        ],
        "curriculum": {"file": "cur.yaml", "lora": {"alpha": 32}, "train": {"grad_accum": 4}},
        "evaluation": {
            "sets": [{"dataset": "emocomics35", "path": "data/ec", "task": "utterance"}]
        },
    }
    exp.update(over)
    return exp


def _write(tmp_path: Path, exp: dict) -> Path:
    (tmp_path / "cur.yaml").write_text(yaml.safe_dump(CURRICULUM))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _stage_settings(exp, arch) -> tuple[LoraSettings, TrainSettings]:
    cur = parse_curriculum(curriculum_of(exp, arch, "unused/base", 0, exp.stages))
    return cur.lora, cur.train


def test_valid_overrides_reach_the_stage_settings_as_before(tmp_path):
    data = _experiment()
    exp = load_experiment(_write(tmp_path, data), inline_dir=tmp_path / "r")
    a, b = exp.spec.architectures
    # the rule the untyped mappings followed: the file's settings, then curriculum.lora/train,
    # then the architecture's raw mapping, validated once when the stage is trained
    for arch, raw in ((a, data["architectures"][0]), (b, data["architectures"][1])):
        lora, train = _stage_settings(exp, arch)
        old_lora = LoraSettings.model_validate(
            {
                **LoraSettings.model_validate(CURRICULUM["lora"]).model_dump(),
                **data["curriculum"]["lora"],
                **raw.get("lora", {}),
            }
        )
        old_train = TrainSettings.model_validate(
            {
                **TrainSettings.model_validate(CURRICULUM["train"]).model_dump(),
                **data["curriculum"]["train"],
                **raw.get("train", {}),
            }
        )
        assert lora == old_lora and train == old_train
        # and the same dumps: the stage content hashes (resume keys) do not move
        assert lora.model_dump() == old_lora.model_dump()
        assert train.model_dump() == old_train.model_dump()
    # what that is, written out
    lora, train = _stage_settings(exp, a)
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32.0, 0.1)
    assert (train.lr, train.grad_accum, train.batch_size, train.scheduler) == (5e-5, 4, 2, "cosine")
    assert train.max_grad_norm is None and train.max_pixels is None  # explicit nulls applied
    lora, train = _stage_settings(exp, b)
    assert (lora.r, lora.alpha, train.lr, train.max_pixels, train.max_grad_norm) == (
        4,
        32.0,
        1e-3,
        5000,
        1.0,
    )
    # only the keys given are overrides (an unset key never resets the curriculum's value)
    assert a.lora.set_values() == {"r": 16}
    assert a.train.set_values() == {"lr": 5e-5, "max_grad_norm": None, "max_pixels": None}
    assert b.lora.set_values() == {} and b.train.set_values() == {}


@pytest.mark.parametrize(
    "where, value, key, problem",
    [
        ("architectures.0.lora", {"rank": 8}, "architectures.0.lora.rank", "unknown key"),
        ("architectures.1.train", {"lrr": 1e-4}, "architectures.1.train.lrr", "unknown key"),
        ("curriculum.train", {"batchsize": 2}, "curriculum.train.batchsize", "unknown key"),
        (
            "architectures.0.lora",
            {"r": "sixteen"},
            "architectures.0.lora.r",
            "must be a valid integer, unable to parse string as an integer, got 'sixteen'",
        ),
        (
            "architectures.0.lora",
            {"r": None},
            "architectures.0.lora.r",
            "must be a valid integer, got None",
        ),
        (
            "architectures.0.lora",
            {"target_regex": "("},
            "architectures.0.lora.target_regex",
            "not a valid regex",
        ),
        (
            "architectures.1.train",
            {"batch_size": 0},
            "architectures.1.train.batch_size",
            "must be greater than or equal to 1, got 0",
        ),
        (
            "architectures.1.train",
            {"scheduler": "step"},
            "architectures.1.train.scheduler",
            "must be 'constant', 'linear' or 'cosine', got 'step'",
        ),
        (
            "curriculum.lora",
            {"dropout": 1.5},
            "curriculum.lora.dropout",
            "must be less than 1, got 1.5",
        ),
    ],
)
def test_bad_overrides_fail_at_load_with_the_field_path(tmp_path, where, value, key, problem):
    data = _experiment()
    node = data
    *parents, last = where.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as exc:
        load_experiment(path, inline_dir=tmp_path / "r")
    assert str(exc.value).startswith(f"{path.resolve()}: key '{key}': {problem}"), str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_override_through_the_cli_is_one_line_exit_2(tmp_path):
    from emomerge.cli import app

    data = _experiment()
    data["architectures"][0]["train"] = {"quantize4bit": True}
    path = _write(tmp_path, data)
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2
    assert r.stderr == (
        f"error: {path.resolve()}: key 'architectures.0.train.quantize4bit': unknown key\n"
    )
    assert not (tmp_path / "run").exists()
