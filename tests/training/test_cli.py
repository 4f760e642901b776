"""CLI wiring: train, data inspect/synthetic, export-llamafactory, tiny-model; exit 2 on bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from emomerge.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json_on_the_real_file(shared_data):
    path = shared_data / "emocomics35" / "emocomics35_pg_images_original.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    result = _run("data", "inspect", "emocomics35", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON object
    assert report["splits"]["TRAIN"]["utterances"] == 5803
    assert report["splits"]["TEST"]["repairs"] == {"unquoted_label_list": 109}


def test_inspect_text(synthetic):
    result = _run("data", "inspect", "emocomics35", synthetic["emocomics35"])
    assert result.exit_code == 0
    assert (
        "[TRAIN] samples" in result.stdout and "parse repairs: unquoted_label_list" in result.stdout
    )


@pytest.mark.parametrize(
    "args,msg",
    [
        (["data", "inspect", "emoart", "/nonexistent/emoart"], "/nonexistent/emoart"),
        (["data", "inspect", "coco", "/"], "unknown dataset"),
        (["data", "synthetic", "coco", "/tmp/x"], "no synthetic writer"),
        (["train", "/nonexistent/cur.yaml", "--out", "/tmp/x"], "curriculum file not found"),
        (["export-llamafactory", "/nonexistent/cur.yaml", "--out", "/tmp/x"], "not found"),
        (["tiny-model", "gpt2", "/tmp/never"], "unknown family"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, msg):
    result = _run(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and msg in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_bad_curriculum_key(tmp_path):
    cur = tmp_path / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            {
                "base_model": "m",
                "stages": [{"name": "a", "dataset": "emoart", "path": "x", "step": 3}],
            }
        )
    )
    result = _run("train", cur, "--out", tmp_path / "run")
    assert result.exit_code == 2 and f"{cur}: key 'stages.0" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_train_and_export_commands(tmp_path, tiny_model, synthetic):
    cur = tmp_path / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model("qwen3_vl")),
                "lora": {"r": 2, "alpha": 4},
                "stages": [
                    {
                        "name": "art",
                        "dataset": "emoart",
                        "path": str(synthetic["emoart"]),
                        "steps": 1,
                        "max_samples": 4,
                    }
                ],
            }
        )
    )
    result = _run("train", cur, "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "run" / "adapters" / "art")
    # Same command again: the finished stage is kept, nothing retrained.
    mtime = (tmp_path / "run" / "adapters" / "art" / "adapter_model.safetensors").stat().st_mtime_ns
    assert _run("train", cur, "--out", tmp_path / "run", "--no-progress").exit_code == 0
    assert (
        tmp_path / "run" / "adapters" / "art" / "adapter_model.safetensors"
    ).stat().st_mtime_ns == mtime
    result = _run("export-llamafactory", cur, "--out", tmp_path / "lf")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "lf" / "01_art.yaml").read_text())
    assert cfg["template"] == "qwen3_vl_nothink"


def test_synthetic_and_tiny_model_commands(tmp_path):
    result = _run("data", "synthetic", "emoart", tmp_path / "art", "--n", "6", "--seed", "2")
    assert result.exit_code == 0 and (tmp_path / "art" / "Annotation.json").is_file()
    result = _run("tiny-model", "llava_next", tmp_path / "m")
    assert result.exit_code == 0 and (tmp_path / "m" / "config.json").is_file()


def test_train_progress_drawn_on_a_terminal_only(tmp_path, tiny_model, synthetic, monkeypatch):
    """EMOMERGE_PROGRESS=1 stands in for a terminal: the stage's bar with its steps and rate on
    stderr, stdout still only the adapter folder; --no-progress and --quiet draw nothing."""
    import re

    cur = tmp_path / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model("qwen3_vl")),
                "lora": {"r": 2, "alpha": 4},
                "stages": [
                    {
                        "name": "art",
                        "dataset": "emoart",
                        "path": str(synthetic["emoart"]),
                        "steps": 2,
                        "max_samples": 4,
                    }
                ],
            }
        )
    )
    monkeypatch.setenv("EMOMERGE_PROGRESS", "1")
    monkeypatch.setenv("COLUMNS", "200")
    result = _run("train", cur, "--out", tmp_path / "on")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "on" / "adapters" / "art")
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stderr)
    assert re.search(r"train art \(stage 1/1\).* 2/2 \d+\.\d\d steps/s ETA", drawn)
    assert re.search(r"loss \d+\.\d{4}", drawn)
    for flag, out in (("--no-progress", "off"), ("--quiet", "quiet")):
        result = _run("train", cur, "--out", tmp_path / out, flag)
        assert result.exit_code == 0, result.output
        assert "steps/s" not in result.output and "train art" not in result.output
