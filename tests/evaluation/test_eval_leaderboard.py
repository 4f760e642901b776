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
    cols = [c for c in L.COLUMNS if c not in L.LATER_COLUMNS]
    with old.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerow({c: L.fmt_value(row("s1", "stage", 0.4).get(c)) for c in cols})
    assert L.read_rows(old)[0]["threshold_source"] == ""
    L.upsert_rows(old, [r])
    with old.open() as fh:
        assert tuple(next(csv.reader(fh))) == L.COLUMNS
    assert [x["variant"] for x in L.read_rows(old)] == ["s1", "m1"]


# ---------------------------------------------------------------- columns added later


def test_new_columns_sit_where_the_runner_expects_them():
    cols = L.COLUMNS
    for m in L.METRIC_COLUMNS:
        assert cols.index(f"{m}_p_holm") == cols.index(f"{m}_p") + 1
    for c in ("label_set", "per_label_f1", "representation", "represented_rank",
              "lowrank_error_mean", "lowrank_error_max", "scoring", "threshold", "n_books"):
        assert c in cols and c in L.LATER_COLUMNS
    assert len(set(cols)) == len(cols)


@pytest.mark.parametrize("dropped", [
    ("threshold_source",),                                   # the first release's header
    ("per_label_f1", "macro_f1_p_holm", "n_books"),          # any subset may be missing
    None,                                                    # all of them
])
def test_leaderboards_missing_later_columns_are_read_and_upgraded(tmp_path, dropped):
    dropped = L.LATER_COLUMNS if dropped is None else dropped
    old = tmp_path / "old.csv"
    cols = [c for c in L.COLUMNS if c not in dropped]
    with old.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerow({c: L.fmt_value(row("s1", "stage", 0.4).get(c)) for c in cols})
    (read,) = L.read_rows(old)
    assert all(read[c] == "" for c in dropped) and read["macro_f1"] == "0.4"
    L.upsert_rows(old, [{**row("m1", "merged", 0.5), "n_books": 3}])
    with old.open() as fh:
        assert tuple(next(csv.reader(fh))) == L.COLUMNS
    assert [(x["variant"], x["n_books"]) for x in L.read_rows(old)] == [("s1", ""), ("m1", "3")]


def test_headers_missing_an_original_column_or_with_unknown_ones_are_refused(tmp_path):
    for name, cols in (("a.csv", [c for c in L.COLUMNS if c != "macro_f1"]),
                       ("b.csv", [*L.COLUMNS, "colour"]),
                       ("c.csv", [*L.COLUMNS, "variant"])):
        path = tmp_path / name
        path.write_text(",".join(cols) + "\n")
        with pytest.raises(InputError, match=f"{name}: not an emomerge leaderboard"):
            L.read_rows(path)


def test_label_set_and_per_label_cells(tmp_path):
    assert L.format_label_set(["Anger", "Disgust", "Fear"]) == "Anger;Disgust;Fear"
    cell = L.format_per_label({"Anger": 0.41234567, "Disgust": 0.0, "Fear": 1.0, "Joy": 2 / 3})
    assert cell == "Anger=0.4123;Disgust=0;Fear=1;Joy=0.6667"
    assert L.parse_per_label(cell) == {"Anger": 0.4123, "Disgust": 0.0, "Fear": 1.0,
                                       "Joy": 0.6667}
    assert L.parse_per_label("") == {}
    with pytest.raises(ValueError, match="representation"):
        L.upsert_rows(tmp_path / "lb.csv", [{**row("m1", "merged", 0.5), "representation": "approx"}])
    assert not (tmp_path / "lb.csv").exists()


def _p_rows() -> list[dict]:
    base = {**row("s2", "stage", 0.40), "n_boot": 1000, "macro_f1_p": None}
    m1 = {**row("m1", "merged", 0.50), "n_boot": 1000, "macro_f1_p": 1 / 1001,
          "macro_f1_p_holm": 2 / 1001}
    m2 = {**row("m2", "merged", 0.45), "n_boot": 1000, "macro_f1_p": 0.04,
          "macro_f1_p_holm": 0.08}
    # an exact test's p below the bootstrap floor is a number, not a floor
    m3 = {**row("m3", "merged", 0.30), "n_boot": 1000, "macro_f1_p": 1.5e-6,
          "macro_f1_p_holm": 4.5e-6}
    triv = {**row("trivial-majority", "trivial", 0.10), "n_boot": 200,
            "macro_f1_p": 1 / 201, "representation": "trivial"}
    return [base, m1, m2, m3, triv]


def test_show_marks_holm_significance_and_the_bootstrap_floor(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, _p_rows())
    lines = L.show(path).strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    i = header.index("macro_f1")
    assert header[i + 1:i + 3] == ["p(macro_f1)", "p_adj(macro_f1)"]
    assert "representation" in header      # some row has one
    cells = {r[1]: r for r in ([c.strip() for c in ln.strip("|").split("|")]
                               for ln in lines[2:])}
    # m1: raw p at the floor 1/1001 -> "< 0.001"; adjusted 2/1001 = 0.001998 < 0.05 -> *
    assert cells["m1"][i:i + 3] == ["0.5000 [0.4000, 0.6000] *", "< 0.001", "0.002"]
    # m2: raw 0.04 but Holm 0.08: no star
    assert cells["m2"][i:i + 3] == ["0.4500 [0.3500, 0.5500]", "0.04", "0.08"]
    assert cells["m3"][i:i + 3] == ["0.3000 [0.2000, 0.4000] *", "1.5e-06", "4.5e-06"]
    # the trivial row: floor of its own n_boot (1/201 -> "< 0.005"), no adjusted p, no star
    assert cells["trivial-majority"][i:i + 3] == ["0.1000 [0.0000, 0.2000]", "< 0.005", ""]
    assert cells["s2"][i + 1:i + 3] == ["", ""]


def test_floor_rule_reads_the_written_cell():
    # the CSV keeps 6 significant digits: 1/1001 is written 0.000999001
    r = {"n_boot": "1000", "accuracy_p": L.fmt_value(1 / 1001)}
    assert r["accuracy_p"] == "0.000999001" and L.format_p(r, "accuracy_p") == "< 0.001"
    assert L.format_p({"n_boot": "1000", "accuracy_p": "0.000999"}, "accuracy_p") == "0.000999"
    assert L.format_p({"n_boot": "", "accuracy_p": "0.000999001"}, "accuracy_p") == "0.000999"
    assert L.format_p({"n_boot": "50", "accuracy_p": str(1 / 51)}, "accuracy_p") == "< 0.02"


def test_compare_and_csv_show_with_the_new_columns(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    L.upsert_rows(a, _p_rows())
    extra = {"label_set": "A;B", "per_label_f1": "A=0.5;B=0.4", "scoring": "likelihood",
             "threshold": "0.35", "n_books": 4, "represented_rank": 16,
             "lowrank_error_mean": 0.01, "lowrank_error_max": 0.03, "representation": "lowrank"}
    L.upsert_rows(b, [{**r, **extra, "macro_f1": r["macro_f1"] + 0.1} for r in _p_rows()])
    out = L.compare(a, b, fmt="csv").strip().splitlines()
    header = out[0].split(",")
    i = header.index("Δ macro_f1")
    assert {ln.split(",")[1]: ln.split(",")[i] for ln in out[1:]} == {
        "s2": "+0.1000", "m1": "+0.1000", "m2": "+0.1000", "m3": "+0.1000",
        "trivial-majority": "+0.1000"}
    again = tmp_path / "again.csv"
    again.write_text(L.show(b, fmt="csv"))
    assert L.read_rows(again) == L.read_rows(b)
    assert L.read_rows(b)[0]["per_label_f1"] == "A=0.5;B=0.4"


@pytest.mark.parametrize("data,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a UTF-8 text file"),
    ("variant,macro_f1\nd\xe9j\xe0,0.5\n".encode("latin-1"), "not a UTF-8 text file"),
    (b'a,b\n"' + b"x" * 200_000 + b'",1\n', "not a readable CSV file"),  # past field_size_limit
    (b"", "not an emomerge leaderboard"),
])
def test_files_that_are_not_leaderboards_are_one_input_error(tmp_path, data, needle):
    path = tmp_path / "lb.csv"
    path.write_bytes(data)
    with pytest.raises(InputError) as exc:
        L.read_rows(path)
    assert str(exc.value).startswith(f"{path}: {needle}")
    assert "\n" not in str(exc.value)


def test_a_row_longer_than_the_header_names_its_line(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, [row("s1", "stage", 0.4)])
    with path.open("a") as fh:
        fh.write(",".join(["x"] * (len(L.COLUMNS) + 2)) + "\n")
    with pytest.raises(InputError, match=rf"lb.csv:3: {len(L.COLUMNS) + 2} cells but the header "
                                         rf"has {len(L.COLUMNS)} columns"):
        L.read_rows(path)
    with pytest.raises(InputError, match="is a folder"):
        L.read_rows(tmp_path)
