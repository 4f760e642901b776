"""Leaderboard CSV: fixed columns, atomic upsert that replaces a re-run's rows, show/compare."""

from __future__ import annotations

import csv

import pytest

from emomerge.evaluation import leaderboard as L
from emomerge.experiment.plots import plot_leaderboard
from emomerge.merging.errors import InputError


def row(
    variant: str,
    kind: str,
    macro: float,
    *,
    config: str = "c1",
    stage: str = "",
    arch: str = "qwen2_5_vl",
) -> dict:
    return {
        "architecture": arch,
        "base_id": "tiny",
        "variant": variant,
        "kind": kind,
        "stage_index": stage,
        "dataset": "emoart",
        "split": "test",
        "task": "single",
        "n": 10,
        "macro_f1": macro,
        "macro_f1_lo": macro - 0.1,
        "macro_f1_hi": macro + 0.1,
        "macro_f1_p": 0.5,
        "accuracy": macro,
        "parse_failures": 0,
        "config_hash": config,
    }


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
    L.upsert_rows(
        path, [row("base", "base", 0.2), row("s1", "stage", 0.4), row("m1", "merged", 0.5)]
    )
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
    assert cells["m1"][i] == "" and cells["m2"][i] == ""  # only in one file: no delta
    assert "Δ macro_f1" in L.compare(a, b)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(
        path,
        [
            row("base", "base", 0.2),
            row("s1", "stage", 0.4, stage="0"),
            row("s2", "stage", 0.45, stage="1"),
            row("m1", "merged", 0.5),
            row("base", "base", 0.1, arch="llava"),
        ],
    )
    out = plot_leaderboard([path], tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _plotted(ax, labelled=None) -> dict[str, float]:
    """variant → x of its point in a grid panel (names from the panel that labels the rows)."""
    names = [t.get_text() for t in (labelled or ax).get_yticklabels()]
    return {
        names[int(ln.get_ydata()[0])]: float(ln.get_xdata()[0])
        for ln in ax.get_lines()
        if ln.get_marker() in ("o", "D") and len(ln.get_xdata()) == 1
    }


def test_plot_draws_every_row_as_the_experiment_plot_does(tmp_path):
    import matplotlib.pyplot as plt

    from emomerge.experiment.plots import leaderboard_figure

    kinds = [
        "base",
        "trivial",
        "single-stage",
        "stage",
        "stage",
        "merged",
        "chain-ablation",
        "merge-ablation",
    ]
    names = [
        "base",
        "trivial-majority",
        "single-stage",
        "s1",
        "s2",
        "ties",
        "chain-without-s1",
        "ties-without-s1",
    ]
    rows = []
    for ds, shift in (("emoart", 0.0), ("emid", 0.05)):
        for i, (name, kind) in enumerate(zip(names, kinds)):
            r = {
                **row(name, kind, 0.1 + 0.05 * i + shift),
                "dataset": ds,
                "n_groups": 7,
                "seed": 0,
                "n_boot": 200,
                "baseline": "s2",
                "macro_f1_p": 0.001,
                "macro_f1_p_holm": 0.01 if name == "ties" else 0.2,
            }
            rows.append({**r, "macro_f1_p": "", "macro_f1_p_holm": ""} if name == "s2" else r)
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, rows)
    fig = leaderboard_figure([path])
    try:
        assert [ax.get_title() for ax in fig.axes] == [
            "qwen2_5_vl — emoart/test",
            "qwen2_5_vl — emid/test",
        ]
        for ax, shift in zip(fig.axes, (0.0, 0.05)):  # every row, at its value
            assert _plotted(ax, fig.axes[0]) == pytest.approx(
                {n: 0.1 + 0.05 * i + shift for i, n in enumerate(names)}
            )
            # significance after Holm: only ties (raw p 0.001 everywhere)
            stars = {round(t.xy[1]) for t in ax.texts if t.get_text() == "*"}
            assert stars == {names.index("ties")}
            assert not [t for t in ax.texts if t.get_text()[:1].isdigit()]  # no value labels
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "s2 (baseline)" in legend and "p < 0.05 vs baseline (Holm-adjusted)" in legend
        caption = next(t.get_text() for t in fig.texts if t.get_text().startswith("emoart"))
        assert "emoart/test: n = 10 items in 7 groups; seed 0; 200 bootstrap replicates" in caption
        assert "emid/test:" in caption
    finally:
        plt.close(fig)
    fig = leaderboard_figure([path], kinds=["stage", "merged"], dataset="emid")
    try:
        assert set(_plotted(fig.axes[0])) == {"s1", "s2", "ties"}
        assert fig._suptitle.get_text().endswith("only stage, merged")
    finally:
        plt.close(fig)
    with pytest.raises(InputError, match="--kinds: unknown kind 'merge'"):
        leaderboard_figure([path], kinds=["merge"])


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
    for c in (
        "label_set",
        "per_label_f1",
        "representation",
        "represented_rank",
        "lowrank_error_mean",
        "lowrank_error_max",
        "scoring",
        "threshold",
        "n_books",
    ):
        assert c in cols and c in L.LATER_COLUMNS
    assert len(set(cols)) == len(cols)


@pytest.mark.parametrize(
    "dropped",
    [
        ("threshold_source",),  # the first release's header
        ("per_label_f1", "macro_f1_p_holm", "n_books"),  # any subset may be missing
        None,  # all of them
    ],
)
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
    for name, cols in (
        ("a.csv", [c for c in L.COLUMNS if c != "macro_f1"]),
        ("b.csv", [*L.COLUMNS, "colour"]),
        ("c.csv", [*L.COLUMNS, "variant"]),
    ):
        path = tmp_path / name
        path.write_text(",".join(cols) + "\n")
        with pytest.raises(InputError, match=f"{name}: not an emomerge leaderboard"):
            L.read_rows(path)


def test_label_set_and_per_label_cells(tmp_path):
    assert L.format_label_set(["Anger", "Disgust", "Fear"]) == "Anger;Disgust;Fear"
    cell = L.format_per_label({"Anger": 0.41234567, "Disgust": 0.0, "Fear": 1.0, "Joy": 2 / 3})
    assert cell == "Anger=0.4123;Disgust=0;Fear=1;Joy=0.6667"
    assert L.parse_per_label(cell) == {"Anger": 0.4123, "Disgust": 0.0, "Fear": 1.0, "Joy": 0.6667}
    assert L.parse_per_label("") == {}
    with pytest.raises(ValueError, match="representation"):
        L.upsert_rows(
            tmp_path / "lb.csv", [{**row("m1", "merged", 0.5), "representation": "approx"}]
        )
    assert not (tmp_path / "lb.csv").exists()


def _p_rows() -> list[dict]:
    base = {**row("s2", "stage", 0.40), "n_boot": 1000, "macro_f1_p": None}
    m1 = {
        **row("m1", "merged", 0.50),
        "n_boot": 1000,
        "macro_f1_p": 1 / 1001,
        "macro_f1_p_holm": 2 / 1001,
    }
    m2 = {**row("m2", "merged", 0.45), "n_boot": 1000, "macro_f1_p": 0.04, "macro_f1_p_holm": 0.08}
    # an exact test's p below the bootstrap floor is a number, not a floor
    m3 = {
        **row("m3", "merged", 0.30),
        "n_boot": 1000,
        "macro_f1_p": 1.5e-6,
        "macro_f1_p_holm": 4.5e-6,
    }
    triv = {
        **row("trivial-majority", "trivial", 0.10),
        "n_boot": 200,
        "macro_f1_p": 1 / 201,
        "representation": "trivial",
    }
    return [base, m1, m2, m3, triv]


def test_show_marks_holm_significance_and_the_bootstrap_floor(tmp_path):
    path = tmp_path / "lb.csv"
    L.upsert_rows(path, _p_rows())
    lines = L.show(path).strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    i = header.index("macro_f1")
    assert header[i + 1 : i + 3] == ["p(macro_f1)", "p_adj(macro_f1)"]
    assert "representation" in header  # some row has one
    cells = {r[1]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    # m1: raw p at the floor 1/1001 -> "< 0.001"; adjusted 2/1001 = 0.001998 < 0.05 -> *
    assert cells["m1"][i : i + 3] == ["0.5000 [0.4000, 0.6000] *", "< 0.001", "0.002"]
    # m2: raw 0.04 but Holm 0.08: no star
    assert cells["m2"][i : i + 3] == ["0.4500 [0.3500, 0.5500]", "0.04", "0.08"]
    assert cells["m3"][i : i + 3] == ["0.3000 [0.2000, 0.4000] *", "1.5e-06", "4.5e-06"]
    # the trivial row: floor of its own n_boot (1/201 -> "< 0.005"), no adjusted p, no star
    assert cells["trivial-majority"][i : i + 3] == ["0.1000 [0.0000, 0.2000]", "< 0.005", ""]
    assert cells["s2"][i + 1 : i + 3] == ["", ""]


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
    extra = {
        "label_set": "A;B",
        "per_label_f1": "A=0.5;B=0.4",
        "scoring": "likelihood",
        "threshold": "0.35",
        "n_books": 4,
        "represented_rank": 16,
        "lowrank_error_mean": 0.01,
        "lowrank_error_max": 0.03,
        "representation": "lowrank",
    }
    L.upsert_rows(b, [{**r, **extra, "macro_f1": r["macro_f1"] + 0.1} for r in _p_rows()])
    out = L.compare(a, b, fmt="csv").strip().splitlines()
    header = out[0].split(",")
    i = header.index("Δ macro_f1")
    assert {ln.split(",")[1]: ln.split(",")[i] for ln in out[1:]} == {
        "s2": "+0.1000",
        "m1": "+0.1000",
        "m2": "+0.1000",
        "m3": "+0.1000",
        "trivial-majority": "+0.1000",
    }
    again = tmp_path / "again.csv"
    again.write_text(L.show(b, fmt="csv"))
    assert L.read_rows(again) == L.read_rows(b)
    assert L.read_rows(b)[0]["per_label_f1"] == "A=0.5;B=0.4"


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a UTF-8 text file"),
        ("variant,macro_f1\nd\xe9j\xe0,0.5\n".encode("latin-1"), "not a UTF-8 text file"),
        (b'a,b\n"' + b"x" * 200_000 + b'",1\n', "not a readable CSV file"),  # past field_size_limit
        (b"", "not an emomerge leaderboard"),
    ],
)
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
    with pytest.raises(
        InputError,
        match=rf"lb.csv:3: {len(L.COLUMNS) + 2} cells but the header "
        rf"has {len(L.COLUMNS)} columns",
    ):
        L.read_rows(path)
    with pytest.raises(InputError, match="is a folder"):
        L.read_rows(tmp_path)


def _elsewhere(rows: list[dict[str, str]], base_path: str) -> list[dict[str, str]]:
    """The same rows as written on another machine: another base path, another date."""
    return [{**r, "base_id": base_path, "date": "2031-01-02T03:04:05+00:00"} for r in rows]


def test_compare_pairs_rows_of_another_machine_and_fills_every_delta(tmp_path):
    base = tmp_path / "models" / "tiny-qwen2_5_vl"
    base.mkdir(parents=True)
    ident = L.base_columns(base, "ab" * 32)
    assert ident == {"base_name": "tiny-qwen2_5_vl", "base_fingerprint": "ab" * 8}
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    L.upsert_rows(a, [{**r, "base_id": str(base), **ident} for r in _p_rows()])
    L.upsert_rows(b, _elsewhere(L.read_rows(a), "/home/someone/tiny-qwen2_5_vl-copy"))
    c = L.compare_rows(a, b)
    assert (c.only_a, c.only_b) == ([], [])
    assert len(c.body) == len(_p_rows())
    for m in ("macro_f1", "accuracy"):
        i = c.header.index(f"Δ {m}")
        assert all(cells[i] == "+0.0000" for cells in c.body)
    # identical rows: Δ = 0 within ±√2·0.1 (unpaired, from the two ±0.1 intervals); accuracy
    # has no interval in these rows, so neither has its Δ
    i = c.header.index("Δ macro_f1 95% CI (unpaired)")
    assert {cells[i] for cells in c.body} == {"[-0.1414, +0.1414]"}
    assert {cells[c.header.index("Δ accuracy 95% CI (unpaired)")] for cells in c.body} == {""}
    assert c.note().startswith(f"{len(_p_rows())} rows matched; only in A: 0; only in B: 0")


def test_compare_does_not_pair_another_base_and_says_so(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    ident = {"base_name": "tiny", "base_fingerprint": "1" * 16}
    L.upsert_rows(a, [{**r, **ident} for r in _p_rows()[:2]])
    # same name, other weights: the fingerprint decides
    L.upsert_rows(b, [{**r, **ident, "base_fingerprint": "2" * 16} for r in _p_rows()[:1]])
    c = L.compare_rows(a, b)
    assert len(c.only_a) == 2 and len(c.only_b) == 1
    i = c.header.index("Δ macro_f1")
    assert [cells[i] for cells in c.body] == ["", "", ""]
    assert c.note("A", "B").startswith(
        "0 rows matched; only in A: 2 (s2 emoart/test, m1 "
        "emoart/test); only in B: 1 (s2 emoart/test)"
    )
    assert "fingerprint" in c.note()


def test_compare_reads_old_files_by_the_base_folder_name(tmp_path):
    # written before base_name / base_fingerprint: the last part of base_id is the name
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    old = [c for c in L.COLUMNS if c not in ("base_name", "base_fingerprint")]
    for path, base_id, macro in ((a, "/m1/tiny", 0.4), (b, "/other/disk/tiny", 0.5)):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=old, extrasaction="ignore")
            w.writeheader()
            w.writerow({**{c: "" for c in old}, **row("m1", "merged", macro), "base_id": base_id})
    c = L.compare_rows(a, b)
    i = c.header.index("Δ macro_f1")
    assert [cells[i] for cells in c.body] == ["+0.1000"]
    # MOVER: Δ ± √(0.1² + 0.1²)
    assert c.body[0][i + 1] == f"[{0.1 - 0.02**0.5:+.4f}, {0.1 + 0.02**0.5:+.4f}]"
