"""The CLI wiring: evaluate → leaderboard show / compare / plot, ablations, and error exits."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.evaluation.leaderboard import read_rows


@pytest.fixture(scope="module")
def results(tiny_base, stage_dirs, merge_dirs, emoart_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "results"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            str(stage_dirs[0].parent),
            *map(str, merge_dirs),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--split",
            "test",
            "--out",
            str(out),
            "--n-boot",
            "20",
            "--leave-one-stage-out",
        ],
    )
    assert res.exit_code == 0, res.output + str(res.exception)
    return out


def test_evaluate_writes_rows_for_every_variant(results):
    rows = read_rows(results / "leaderboard.csv")
    names = [r["variant"] for r in rows]
    assert names[:5] == ["base", "s1_emoart", "s2_emocomics35", "linear", "ties"]
    # leave-one-stage-out: each merge rebuilt without each of its two stages
    assert sorted(names[5:-1]) == [
        "linear-without-emoart",
        "linear-without-emocomics35",
        "ties-without-emoart",
        "ties-without-emocomics35",
    ]
    assert names[-1] == "trivial-majority"  # a constant predictor, counted on the train split
    by = {r["variant"]: r for r in rows}
    abl = by["ties-without-emoart"]
    assert abl["kind"] == "merged" and abl["method"] == "ties"
    assert abl["stages_merged"] == "emocomics35"
    # the re-factorised TIES adapter (rank 4) is scored exactly; every row says how
    assert [
        by[n]["representation"] for n in ("base", "s1_emoart", "linear", "ties", "trivial-majority")
    ] == ["base", "exact", "exact", "exact", "trivial"]
    assert by["trivial-majority"]["kind"] == "trivial" and by["trivial-majority"]["macro_f1_p"]
    assert by["trivial-majority"]["macro_f1_p_holm"] == ""  # not in the family
    assert all(
        by[n]["macro_f1_p_holm"] for n in names if n not in ("s2_emocomics35", "trivial-majority")
    )
    assert by["ties"]["label_set"].count(";") == len(by["ties"]["per_label_f1"].split(";")) - 1
    assert all(r["baseline"] == "s2_emocomics35" for r in rows)
    assert all(r["git_hash"] is not None and r["emomerge_version"] for r in rows)


def test_leaderboard_rows_record_the_software(results):
    """Every row carries ``versions`` (the installed distributions, as importlib.metadata reads
    them) and ``git_dirty`` of emomerge's source tree."""
    from importlib import metadata

    from emomerge.merging.provenance import git_dirty

    with (results / "leaderboard.csv").open(newline="") as fh:
        header = next(csv.reader(fh))
    assert "versions" in header and "git_dirty" in header
    rows = read_rows(results / "leaderboard.csv")
    dirty = git_dirty()
    for r in rows:
        cells = dict(item.split("=", 1) for item in r["versions"].split())
        assert cells["torch"] == metadata.version("torch")
        assert cells["transformers"] == metadata.version("transformers")
        assert cells["peft"] == metadata.version("peft")
        assert cells["emomerge"] == metadata.version("emomerge")
        assert cells["python"] == platform.python_version()
        assert r["git_dirty"] == ("" if dirty is None else str(dirty))


def test_leaderboard_show_compare_plot(results, tmp_path):
    csv_path = results / "leaderboard.csv"
    runner = CliRunner()
    md = runner.invoke(app, ["leaderboard", "show", str(csv_path), "--by", "macro_f1"])
    assert md.exit_code == 0 and md.output.startswith("| architecture | variant |")
    again = tmp_path / "again.csv"
    out = runner.invoke(app, ["leaderboard", "show", str(csv_path), "--format", "csv"])
    again.write_text(out.output)
    assert read_rows(again) == read_rows(csv_path)  # CSV round trip
    cmp = runner.invoke(app, ["leaderboard", "compare", str(csv_path), str(again)])
    assert cmp.exit_code == 0 and "+0.0000" in cmp.output
    fig = tmp_path / "fig.png"
    res = runner.invoke(app, ["leaderboard", "plot", str(csv_path), "--out", str(fig)])
    assert res.exit_code == 0, res.output
    assert fig.read_bytes()[:4] == b"\x89PNG"
    cms = sorted((tmp_path / "fig_confusion").glob("*.png"))
    assert len(cms) == 10  # 9 model variants and the trivial majority row


def test_compare_pairs_a_copy_made_on_another_machine(results, tmp_path):
    import csv

    from emomerge.evaluation.leaderboard import COLUMNS, compare_rows

    rows = read_rows(results / "leaderboard.csv")
    # the runner writes the base's portable identity next to this machine's path
    assert {r["base_name"] for r in rows} == {Path(rows[0]["base_id"]).name}
    assert all(len(r["base_fingerprint"]) == 16 for r in rows)
    other = tmp_path / "elsewhere" / "leaderboard.csv"
    other.parent.mkdir()
    with other.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(
            {
                **r,
                "base_id": "/srv/other-machine/models/" + r["base_name"],
                "date": "2031-01-02T03:04:05+00:00",
            }
            for r in rows
        )
    c = compare_rows(results / "leaderboard.csv", other)
    assert (c.only_a, c.only_b, len(c.body)) == ([], [], len(rows))
    deltas = [i for i, h in enumerate(c.header) if h.startswith("Δ ") and "CI" not in h]
    assert deltas and all(
        cells[i] == "+0.0000" for cells in c.body for i in deltas if cells[i - 2]
    )  # every metric the row has
    assert all(
        cells[i + 1].startswith("[")
        for cells in c.body
        for i in deltas
        if cells[i - 2] and rows[0].get(c.header[i][2:] + "_lo")
    )
    res = CliRunner().invoke(
        app,
        [
            "leaderboard",
            "compare",
            str(results / "leaderboard.csv"),
            str(other),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"{len(rows)} rows matched; only in A" in res.output


def test_bad_input_is_one_line_and_exit_2(tiny_base, emoart_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            str(tmp_path / "nope"),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2
    assert "nope: no such file or directory" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    res = runner.invoke(app, ["leaderboard", "show", str(bad)])
    assert res.exit_code == 2 and "not an emomerge leaderboard" in res.output
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--mode",
            "beam",
        ],
    )
    assert res.exit_code == 2 and "--mode" in res.output


def test_bad_settings_fail_before_any_model_or_merge_runs(
    tiny_base, merge_dirs, emoart_dir, tmp_path
):
    runner = CliRunner()
    out = tmp_path / "res"
    # --judge-url without --judge-model: refused before generation (no prediction written)
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--dataset",
            "mangavqa",
            "--data",
            str(emoart_dir),
            "--judge-url",
            "http://localhost:1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "--judge-model" in res.output
    assert not out.exists()
    # an unknown --baseline: refused before the leave-one-stage-out merges are built
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            *map(str, merge_dirs),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--leave-one-stage-out",
            "--baseline",
            "nope",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "--baseline: 'nope'" in res.output
    assert not (out / "ablations").exists()


def _recorded_on(src, dst, base_name: str, base_hash: str | None):
    import json
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "emomerge.json").read_text())
    meta["base"] = {"name_or_path": base_name, "hash": base_hash, "family": "qwen2_5_vl"}
    (dst / "emomerge.json").write_text(json.dumps(meta))
    return dst


def test_a_variant_recorded_on_another_base_is_refused_unless_allowed(
    tiny_base, stage_dirs, tmp_path
):
    from emomerge.evaluation.pipeline import check_variants
    from emomerge.evaluation.variants import discover
    from emomerge.merging.errors import InputError
    from emomerge.training.models.fingerprint import fingerprint

    other = _recorded_on(stage_dirs[0], tmp_path / "other", "/elsewhere/tiny-qwen2_5_vl", "f" * 64)
    variants = discover([other])
    with pytest.raises(InputError) as exc:
        check_variants(variants, tiny_base)
    msg = str(exc.value)
    assert msg.startswith(
        f"{other}: recorded as trained on '/elsewhere/tiny-qwen2_5_vl' "
        "(hash ffffffffffff) (emomerge.json base) but the loaded base is "
        f"{tiny_base} (hash {fingerprint(tiny_base)[:12]})"
    )
    assert "--allow-different-bases" in msg
    check_variants(variants, tiny_base, allow_base_mismatch=True)  # the override
    # the hash training records for this very base passes, whatever the folder was called
    same = _recorded_on(stage_dirs[0], tmp_path / "same", "/renamed/base", fingerprint(tiny_base))
    check_variants(discover([same]), tiny_base)


def test_base_names_follow_mergings_rules():
    from emomerge.evaluation.pipeline import LoadedBase, other_precision, same_base

    assert other_precision("unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert not other_precision("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    hub = LoadedBase("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert same_base("unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit", None, hub) is True
    assert same_base("Qwen/Qwen2.5-VL-72B-Instruct", None, hub) is False
    local = LoadedBase("/models/qwen7b", Path("/models/qwen7b"), "qwen2_5_vl", {"h1"}, "h1")
    assert same_base("/old/place", "h1", local) is True  # the hash decides
    assert same_base("/old/tiny", "h2", local) is False
    # a QLoRA stage recorded the 4-bit copy's hash: the names say it is the same model
    assert same_base("unsloth/qwen7b-bnb-4bit", "h2", local) is True
    assert same_base("some/name", None, local) is None  # merging's fallback decides


def test_a_nan_or_misshapen_variant_is_refused_before_scoring(
    tiny_base, stage_dirs, emoart_dir, tmp_path
):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(stage_dirs[1], bad)
    f = bad / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = min(tensors)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(f))
    out = tmp_path / "res"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            str(bad),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2
    assert res.stderr == f"error: {f}: tensor '{key}' contains Inf values\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--threshold", "2.0", "--threshold: must be a number in [0, 1], got 2.0"),
        ("--threshold", "-inf", "--threshold: must be a number in [0, 1], got -inf"),
        ("--val-fraction", "1", "--val-fraction: must be a number in (0, 1), got 1.0"),
        ("--val-fraction", "nan", "--val-fraction: must be a number in (0, 1), got nan"),
        ("--n-boot", "9", "--n-boot: must be at least 10, got 9"),
        ("--batch-size", "0", "--batch-size: must be at least 1, got 0"),
        ("--max-new-tokens", "-3", "--max-new-tokens: must be at least 1, got -3"),
        ("--max-labels", "0", "--max-labels: must be at least 1, got 0"),
        ("--holdout-seed", "-1", "--holdout-seed: must be at least 0, got -1"),
    ],
)
def test_every_numeric_option_is_checked(tiny_base, emoart_dir, tmp_path, option, value, message):
    out = tmp_path / "res"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--dataset",
            "emoart",
            "--data",
            str(emoart_dir),
            "--out",
            str(out),
            option,
            value,
        ],
    )
    assert res.exit_code == 2 and res.stderr == f"error: {message}\n"
    assert not out.exists()


def test_output_paths_in_the_way(results, tmp_path):
    csv_path = results / "leaderboard.csv"
    runner = CliRunner()
    (tmp_path / "fig.png").mkdir()
    res = runner.invoke(
        app, ["leaderboard", "plot", str(csv_path), "--out", str(tmp_path / "fig.png")]
    )
    assert res.exit_code == 2
    assert res.stderr == f"error: --out {tmp_path / 'fig.png'}: is a folder, not a plot file\n"
    mine = tmp_path / "mine.png"
    mine.write_text("not a plot")
    res = runner.invoke(app, ["leaderboard", "plot", str(csv_path), "--out", str(mine)])
    assert res.exit_code == 2 and "exists and is not a png plot" in res.stderr
    assert mine.read_text() == "not a plot"
    # an earlier plot is replaced
    plot = tmp_path / "plot.png"
    assert (
        runner.invoke(
            app, ["leaderboard", "plot", str(csv_path), "--out", str(plot), "--no-confusion"]
        ).exit_code
        == 0
    )
    assert (
        runner.invoke(
            app, ["leaderboard", "plot", str(csv_path), "--out", str(plot), "--no-confusion"]
        ).exit_code
        == 0
    )
    assert plot.read_bytes()[:4] == b"\x89PNG"
