"""Leaderboard CSV: fixed columns, atomic upsert that replaces a re-run's rows, show/compare."""

from __future__ import annotations

import csv

import pytest
from emomerge.evaluation import leaderboard as L
from emomerge.evaluation.plots import plot_leaderboard
from emomerge.merging.errors import InputError


def row(variant: str, kind: str, macro: float, *, config: str = "c1", stage: str = "",
        arch: str = "qwen2_5_vl") -> dict:
    return {"architecture": arch, "base_id": "tiny", "variant": variant, "kind": kind,
            "stage_index": stage, "dataset": "emoart", "split": "test", "task": "single",
            "n": 10, "macro_f1": macro, "macro_f1_lo": macro - 0.1, "macro_f1_hi": macro + 0.1,
            "macro_f1_p": 0.5, "accuracy": macro, "parse_failures": 0, "config_hash": config}


def test_upsert_appends_then_replaces_own_rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    L.upsert_rows(path, [row("base", "base", 0.2), row("s1", "stage", 0.4)])
    L.upsert_rows(path, [row("m1", "merged", 0.5)])
    assert [r["variant"] for r in L.read_rows(path)] == ["base", "s1", "m1"]
    # Same command again (same config hash): replaced, not duplicated.
    L.upsert_rows(path, [row("s1", "stage", 0.45)])
    rows = L.read_rows(path)
    assert [r["variant"] for r in rows] == ["base", "m1", "s1"]
    assert rows[-1]["macro_f1"] == "0.45"
    # Another config keeps both.
    L.upsert_rows(path, [row("s1", "stage", 0.3, config="c2")])
    assert len(L.read_rows(path)) == 4
    # Header is the fixed column tuple, and no temp file is left behind.
    with path.open() as fh:
        assert tuple(next(csv.reader(fh))) == L.COLUMNS
    assert [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


def test_foreign_csv_is_an_input_error(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="other.csv: not an emomerge leaderboard"):
        L.read_rows(bad)


def test_show_round_trip_markdown_and_csv(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, [row("base", "base", 0.2), row("s1", "stage", 0.4),
                         row("m1", "merged", 0.5)])
    md = L.show(path, by="macro_f1")
    lines = md.strip().splitlines()
    assert lines[0].startswith("| architecture | variant |") and "p(macro_f1)" in lines[0]
    assert [ln.split("|")[2].strip() for ln in lines[2:]] == ["m1", "s1", "base"]
    assert "0.5000 [0.4000, 0.6000]" in lines[2]
    # CSV output is the file itself (same header and cells), so it round-trips.
    again = tmp_path / "again.csv"
    again.write_text(L.show(path, fmt="csv"))
    assert L.read_rows(again) == L.read_rows(path)
    with pytest.raises(InputError, match="--by"):
        L.show(path, by="nope")


def test_compare_side_by_side_with_deltas(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    L.upsert_rows(a, [row("s1", "stage", 0.4), row("m1", "merged", 0.5)])
    L.upsert_rows(b, [row("s1", "stage", 0.35), row("m2", "merged", 0.6)])
    out = L.compare(a, b, fmt="csv").strip().splitlines()
    header = out[0].split(",")
    assert header[:4] == ["architecture", "variant", "dataset", "split"]
    i = header.index("Δ macro_f1")
    cells = {ln.split(",")[1]: ln.split(",") for ln in out[1:]}
    assert cells["s1"][i] == "-0.0500"
    assert cells["m1"][i] == "" and cells["m2"][i] == ""   # only in one file: no delta
    assert "Δ macro_f1" in L.compare(a, b)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, [row("base", "base", 0.2), row("s1", "stage", 0.4, stage="0"),
                         row("s2", "stage", 0.45, stage="1"), row("m1", "merged", 0.5),
                         row("base", "base", 0.1, arch="llava")])
    out = plot_leaderboard([path], tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threshold_source_round_trips_and_old_leaderboards_still_read(tmp_path):
    path = tmp_path / "lb.csv"
    r = {**row("m1", "merged", 0.5), "threshold_source": "train-books (not held out)"}
    L.upsert_rows(path, [r])
    assert L.read_rows(path)[0]["threshold_source"] == "train-books (not held out)"
    assert "threshold_source" in L.show(path).splitlines()[0]
    # a leaderboard written before the column existed is read (empty cell) and upgraded
    old = tmp_path / "old.csv"
    cols = [c for c in L.COLUMNS if c != "threshold_source"]
    with old.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerow({c: L.fmt_value(row("s1", "stage", 0.4).get(c)) for c in cols})
    assert L.read_rows(old)[0]["threshold_source"] == ""
    L.upsert_rows(old, [r])
    with old.open() as fh:
        assert tuple(next(csv.reader(fh))) == L.COLUMNS
    assert [x["variant"] for x in L.read_rows(old)] == ["s1", "m1"]
