"""Per-book rows: values against sklearn on each book's samples, the CSV, and the CLI view."""

from __future__ import annotations

import csv
import io
from types import SimpleNamespace

import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.evaluation.bybook import (
    BY_BOOK_COLUMNS,
    book_map,
    by_book_rows,
    read_by_book,
    show_by_book,
    title_map,
    write_by_book,
)
from emomerge.evaluation.metrics import Predictions
from emomerge.merging.errors import InputError

LABELS = ["Anger", "Fear", "Joy", "Sadness"]
# (sample id, page, FileNr, title, gold); books 7 and 12 are one series, 30 another
UNITS = [
    ("u1", "p1", 7, "Comic A", ["Anger"]),
    ("u2", "p1", 7, "Comic A", ["Joy", "Fear"]),
    ("u3", "p2", 7, "Comic A", ["Sadness"]),
    ("u4", "p3", 12, "Comic B", ["Joy"]),
    ("u5", "p3", 12, "Comic B", ["Anger", "Joy"]),
    ("u6", "p4", 30, "Comic C", ["Fear"]),
]
PRED_A = [["Anger"], ["Joy"], ["Sadness"], ["Joy"], ["Anger"], ["Joy"]]
PRED_B = [["Joy"], ["Joy", "Fear"], ["Anger"], ["Joy"], ["Anger", "Joy"], ["Fear"]]
SERIES = {"u1": "Alpha", "u2": "Alpha", "u3": "Alpha", "u4": "Alpha", "u5": "Alpha", "u6": "Beta"}
COMMON = {
    "architecture": "qwen2_5_vl",
    "base_id": "tiny",
    "dataset": "emocomics35",
    "split": "test",
    "config_hash": "c1",
}


def samples() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            id=i,
            group=g,
            labels=gold,
            label_set=LABELS,
            meta={"file_nr": nr, "title": t, "page": 1},
        )
        for i, g, nr, t, gold in UNITS
    ]


def preds(pred: list[list[str]]) -> Predictions:
    return Predictions(
        "multi",
        [u[0] for u in UNITS],
        [u[1] for u in UNITS],
        [u[4] for u in UNITS],
        pred,
        LABELS,
        top1=[p[0] for p in pred],
    )


def sk(idx: list[int], pred: list[list[str]]) -> dict[str, float]:
    """macro-F1 (fixed label set) and subset accuracy by sklearn on the samples ``idx``."""
    mlb = MultiLabelBinarizer(classes=LABELS).fit([LABELS])
    y_true = mlb.transform([UNITS[i][4] for i in idx])
    y_pred = mlb.transform([pred[i] for i in idx])
    return {
        "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
        "subset_accuracy": accuracy_score(y_true, y_pred),
    }


def rows() -> list[dict]:
    s = samples()
    return by_book_rows(
        [("a", preds(PRED_A)), ("b", preds(PRED_B))],
        book_map(s),
        SERIES,
        ["macro_f1", "subset_accuracy"],
        titles=title_map(s),
        **COMMON,
    )


def test_book_and_series_rows_equal_sklearn_on_each_subset():
    got = rows()
    assert [(r["variant"], r["level"], r["book"], r["series"]) for r in got[:5]] == [
        ("a", "book", "7", "Alpha"),
        ("a", "book", "12", "Alpha"),
        ("a", "book", "30", "Beta"),
        ("a", "series", "", "Alpha"),
        ("a", "series", "", "Beta"),
    ]
    members = {"7": [0, 1, 2], "12": [3, 4], "30": [5], "Alpha": [0, 1, 2, 3, 4], "Beta": [5]}
    for r in got:
        idx = members[r["book"] or r["series"]]
        want = sk(idx, PRED_A if r["variant"] == "a" else PRED_B)
        assert r["macro_f1"] == pytest.approx(want["macro_f1"])
        assert r["subset_accuracy"] == pytest.approx(want["subset_accuracy"])
        assert r["n"] == len(idx) and r["n_groups"] == len({UNITS[i][1] for i in idx})
        assert r["architecture"] == "qwen2_5_vl" and r["config_hash"] == "c1"
    # by hand, variant a on book 7: u1 right, u2 {Joy} for {Joy, Fear}, u3 right -> subset 2/3;
    # Anger 1, Fear 0 (FN), Joy 1, Sadness 1 -> macro 3/4
    a7 = got[0]
    assert a7["title"] == "Comic A"
    assert (a7["subset_accuracy"], a7["macro_f1"]) == pytest.approx((2 / 3, 3 / 4))


def test_no_series_means_no_series_rows_and_no_books_means_none():
    s = samples()
    got = by_book_rows([("a", preds(PRED_A))], book_map(s), None, ["macro_f1"])
    assert [r["level"] for r in got] == ["book"] * 3 and all(r["series"] == "" for r in got)
    # EmoArt-like samples name no book: no per-book rows rather than one "book" per sample
    art = [SimpleNamespace(id="x", group="x", meta={"style": "Cubism"})]
    assert book_map(art) is None


def test_page_level_ids_map_to_their_page_sample():
    book = {"000007-p00001": "7"}
    p = Predictions(
        "multi",
        ["000007-p00001#u000", "000007-p00001#u001"],
        ["g", "g"],
        [["Joy"], ["Fear"]],
        [["Joy"], ["Joy"]],
        LABELS,
        top1=["Joy", "Joy"],
    )
    (r,) = by_book_rows([("v", p)], book, None, ["subset_accuracy"])
    assert r["book"] == "7" and r["n"] == 2 and r["subset_accuracy"] == pytest.approx(1 / 2)


def test_book_map_reads_emocomics35_file_numbers(emocomics_dir):
    from emomerge.training.data.emocomics35 import read_emocomics35

    test, _ = read_emocomics35(emocomics_dir, "test")
    books = book_map(test)
    # the synthetic file puts one book (FileNr 1021, "Synthetic Comic #4") in TEST
    assert set(books.values()) == {"1021"} and set(books) == {s.id for s in test}
    assert title_map(test) == {"1021": "Synthetic Comic #4"}


def test_write_upserts_atomically_and_refuses_foreign_files(tmp_path):
    path = tmp_path / "by_book.csv"
    write_by_book(path, rows())
    first = read_by_book(path)
    assert len(first) == 10 and tuple(next(csv.reader(path.open()))) == BY_BOOK_COLUMNS
    # the same evaluation again: replaced, not appended; another config: kept beside
    write_by_book(path, rows()[:3])
    assert len(read_by_book(path)) == 10
    other = [{**r, "config_hash": "c2"} for r in rows()[:2]]
    write_by_book(path, other)
    assert len(read_by_book(path)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["by_book.csv"]
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="x.csv: not an emomerge by-book table"):
        read_by_book(bad)
    with pytest.raises(ValueError, match="unknown columns"):
        write_by_book(path, [{"variant": "a", "colour": "red"}])


def test_cli_show_by_book(tmp_path):
    write_by_book(tmp_path / "by_book.csv", rows())
    runner = CliRunner()
    lb = str(tmp_path / "leaderboard.csv")  # need not exist: only its folder is read
    res = runner.invoke(
        app,
        ["leaderboard", "show", lb, "--by-book", "--metric", "subset_accuracy", "--format", "csv"],
    )
    assert res.exit_code == 0, res.output
    table = list(csv.reader(io.StringIO(res.output)))
    assert table[0] == [
        "dataset",
        "split",
        "variant",
        "metric",
        "7 (Comic A)",
        "12 (Comic B)",
        "30 (Comic C)",
        "series Alpha",
        "series Beta",
    ]
    body = {r[2]: r for r in table[1:]}
    want_a = [
        sk(i, PRED_A)["subset_accuracy"] for i in ([0, 1, 2], [3, 4], [5], [0, 1, 2, 3, 4], [5])
    ]
    assert [float(x) for x in body["a"][4:]] == pytest.approx(want_a, abs=5e-5)
    assert body["b"][3] == "subset_accuracy"
    md = runner.invoke(app, ["leaderboard", "show", lb, "--by-book"])
    assert md.exit_code == 0 and md.output.startswith("| dataset | split | variant | metric |")
    assert "| macro_f1 |" in md.output  # macro-F1 by default
    missing = runner.invoke(
        app, ["leaderboard", "show", str(tmp_path / "sub" / "lb.csv"), "--by-book"]
    )
    assert missing.exit_code == 2
    assert "by_book.csv: no such file" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["leaderboard", "show", lb, "--by-book", "--metric", "nope"])
    assert bad.exit_code == 2 and "--metric" in bad.output


def test_show_by_book_rejects_unknown_format(tmp_path):
    write_by_book(tmp_path / "by_book.csv", rows())
    with pytest.raises(InputError, match="--format"):
        show_by_book(tmp_path / "by_book.csv", fmt="html")


def test_cli_plain_show_still_works_and_metric_needs_by_book(tmp_path):
    from emomerge.evaluation.leaderboard import upsert_rows

    lb = tmp_path / "leaderboard.csv"
    upsert_rows(
        lb,
        [
            {
                "architecture": "qwen2_5_vl",
                "variant": "m1",
                "kind": "merged",
                "dataset": "emoart",
                "split": "test",
                "n": 5,
                "macro_f1": 0.5,
                "macro_f1_p": 0.01,
                "macro_f1_p_holm": 0.02,
                "n_boot": 1000,
            }
        ],
    )
    runner = CliRunner()
    res = runner.invoke(app, ["leaderboard", "show", str(lb)])
    assert res.exit_code == 0, res.output
    assert "| p(macro_f1) | p_adj(macro_f1) |" in res.output and "| 0.5000 * |" in res.output
    bad = runner.invoke(app, ["leaderboard", "show", str(lb), "--metric", "macro_f1"])
    assert bad.exit_code == 2 and "--metric: only with --by-book" in bad.output
