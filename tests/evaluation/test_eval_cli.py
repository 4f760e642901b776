"""The CLI wiring: evaluate → leaderboard show / compare / plot, ablations, and error exits."""

from __future__ import annotations

import pytest
from emomerge.evaluation.leaderboard import read_rows
from typer.testing import CliRunner

from emomerge.cli import app


@pytest.fixture(scope="module")
def results(tiny_base, stage_dirs, merge_dirs, emoart_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "results"
    res = CliRunner().invoke(app, [
        "evaluate", "--base", str(tiny_base), "--variants", str(stage_dirs[0].parent),
        *map(str, merge_dirs), "--dataset", "emoart", "--data", str(emoart_dir),
        "--split", "test", "--out", str(out), "--n-boot", "20", "--leave-one-stage-out"])
    assert res.exit_code == 0, res.output + str(res.exception)
    return out


def test_evaluate_writes_rows_for_every_variant(results):
    rows = read_rows(results / "leaderboard.csv")
    names = [r["variant"] for r in rows]
    assert names[:5] == ["base", "s1_emoart", "s2_emocomics35", "linear", "ties"]
    # leave-one-stage-out: each merge rebuilt without each of its two stages
    assert sorted(names[5:-1]) == ["linear-without-emoart", "linear-without-emocomics35",
                                   "ties-without-emoart", "ties-without-emocomics35"]
    assert names[-1] == "trivial-majority"  # a constant predictor, counted on the train split
    by = {r["variant"]: r for r in rows}
    abl = by["ties-without-emoart"]
    assert abl["kind"] == "merged" and abl["method"] == "ties"
    assert abl["stages_merged"] == "emocomics35"
    # the re-factorised TIES adapter (rank 4) is scored exactly; every row says how
    assert [by[n]["representation"] for n in ("base", "s1_emoart", "linear", "ties",
                                              "trivial-majority")] == \
        ["base", "exact", "exact", "exact", "trivial"]
    assert by["trivial-majority"]["kind"] == "trivial" and by["trivial-majority"]["macro_f1_p"]
    assert by["trivial-majority"]["macro_f1_p_holm"] == ""  # not in the family
    assert all(by[n]["macro_f1_p_holm"] for n in names if n not in ("s2_emocomics35",
                                                                    "trivial-majority"))
    assert by["ties"]["label_set"].count(";") == len(by["ties"]["per_label_f1"].split(";")) - 1
    assert all(r["baseline"] == "s2_emocomics35" for r in rows)
    assert all(r["git_hash"] is not None and r["emomerge_version"] for r in rows)


def test_leaderboard_show_compare_plot(results, tmp_path):
    csv_path = results / "leaderboard.csv"
    runner = CliRunner()
    md = runner.invoke(app, ["leaderboard", "show", str(csv_path), "--by", "macro_f1"])
    assert md.exit_code == 0 and md.output.startswith("| architecture | variant |")
    again = tmp_path / "again.csv"
    out = runner.invoke(app, ["leaderboard", "show", str(csv_path), "--format", "csv"])
    again.write_text(out.output)
    assert read_rows(again) == read_rows(csv_path)            # CSV round trip
    cmp = runner.invoke(app, ["leaderboard", "compare", str(csv_path), str(again)])
    assert cmp.exit_code == 0 and "+0.0000" in cmp.output
    fig = tmp_path / "fig.png"
    res = runner.invoke(app, ["leaderboard", "plot", str(csv_path), "--out", str(fig)])
    assert res.exit_code == 0, res.output
    assert fig.read_bytes()[:4] == b"\x89PNG"
    cms = sorted((tmp_path / "fig_confusion").glob("*.png"))
    assert len(cms) == 10  # 9 model variants and the trivial majority row


def test_bad_input_is_one_line_and_exit_2(tiny_base, emoart_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--base", str(tiny_base), "--variants",
                              str(tmp_path / "nope"), "--dataset", "emoart", "--data",
                              str(emoart_dir), "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "nope: no such file or directory" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    res = runner.invoke(app, ["leaderboard", "show", str(bad)])
    assert res.exit_code == 2 and "not an emomerge leaderboard" in res.output
    res = runner.invoke(app, ["evaluate", "--base", str(tiny_base), "--dataset", "emoart",
                              "--data", str(emoart_dir), "--mode", "beam"])
    assert res.exit_code == 2 and "--mode" in res.output


def test_bad_settings_fail_before_any_model_or_merge_runs(tiny_base, merge_dirs, emoart_dir,
                                                          tmp_path):
    runner = CliRunner()
    out = tmp_path / "res"
    # --judge-url without --judge-model: refused before generation (no prediction written)
    res = runner.invoke(app, ["evaluate", "--base", str(tiny_base), "--dataset", "mangavqa",
                              "--data", str(emoart_dir), "--judge-url", "http://localhost:1",
                              "--out", str(out)])
    assert res.exit_code == 2 and "--judge-model" in res.output
    assert not out.exists()
    # an unknown --baseline: refused before the leave-one-stage-out merges are built
    res = runner.invoke(app, ["evaluate", "--base", str(tiny_base), "--variants",
                              *map(str, merge_dirs), "--dataset", "emoart", "--data",
                              str(emoart_dir), "--leave-one-stage-out", "--baseline", "nope",
                              "--out", str(out)])
    assert res.exit_code == 2 and "--baseline: 'nope'" in res.output
    assert not (out / "ablations").exists()
