"""The variant × dataset grid: table cells and the one-panel-per-dataset plot, from a leaderboard
CSV written with ``upsert_rows``.

The leaderboard is gaining columns (``{m}_p_holm``, ``n_books``, ``representation``...); rows keep
only the columns the installed ``leaderboard.COLUMNS`` has, and the expectations follow: the ``*``
mark comes from the Holm-adjusted p when the column exists, else from the raw p.
"""

from __future__ import annotations

import math

import pytest

from emomerge.evaluation.leaderboard import COLUMNS, read_rows, upsert_rows
from emomerge.experiment.report import (
    format_p,
    grid_table,
    markdown_table,
    significance,
)

HOLM = "macro_f1_p_holm" in COLUMNS
BOOKS = "n_books" in COLUMNS
LOWRANK = "representation" in COLUMNS
FLOOR = 1 / 1001  # the paired bootstrap's smallest p with n_boot = 1000

# variant → kind, method; per dataset: (macro_f1, lo, hi, raw p, Holm p)
VARIANTS = {
    "base": ("base", ""),
    "trivial-majority": ("trivial", ""),
    "emoart": ("stage", ""),
    "emocomics35": ("stage", ""),
    "ties": ("merged", "ties"),
    "linear": ("merged", "linear"),
}
SCORES = {
    "emoart": {
        "base": (0.10, 0.05, 0.20, 0.30, 0.60),
        "trivial-majority": (0.05, 0.00, 0.10, FLOOR, 5 * FLOOR),
        "emoart": (0.60, 0.40, 0.80, FLOOR, 4 * FLOOR),
        "emocomics35": (0.20, 0.10, 0.30, None, None),
        "ties": (0.45, 0.30, 0.60, 0.02, 0.08),
        "linear": (0.35, 0.20, 0.50, 0.01, 0.04),
    },
    "emocomics35": {
        "base": (0.083, 0.050, 0.132, FLOOR, 5 * FLOOR),
        "trivial-majority": (0.040, 0.020, 0.060, FLOOR, 5 * FLOOR),
        "emoart": (0.039, 0.014, 0.060, FLOOR, 5 * FLOOR),
        "emocomics35": (0.306, 0.259, 0.368, None, None),
        "ties": (0.242, 0.167, 0.285, 0.0199, 0.0597),
        "linear": (0.340, 0.280, 0.400, 0.30, 0.60),
    },
}
SETS = {"emoart": ("single", 10, 10, None), "emocomics35": ("multi", 47, 16, 4)}


def _row(dataset: str, variant: str) -> dict[str, object]:
    task, n, n_groups, n_books = SETS[dataset]
    kind, method = VARIANTS[variant]
    f1, lo, hi, p, p_holm = SCORES[dataset][variant]
    row = {
        "architecture": "tiny",
        "base_id": "model/tiny",
        "variant": variant,
        "kind": kind,
        "method": method,
        "dataset": dataset,
        "split": "test",
        "task": task,
        "mode": "likelihood",
        "n": n,
        "n_groups": n_groups,
        "n_books": n_books,
        "baseline": "emocomics35",
        "macro_f1": f1,
        "macro_f1_lo": lo,
        "macro_f1_hi": hi,
        "macro_f1_p": p,
        "macro_f1_p_holm": p_holm,
        "accuracy": f1 + 0.1,
        "seed": 0,
        "n_boot": 1000,
        "config_hash": f"cfg-{dataset}",
        "representation": {"trivial": "trivial", "base": "base"}.get(kind, "exact"),
    }
    if variant == "ties":
        row.update(representation="lowrank", represented_rank=8, lowrank_error_mean=0.14)
    return {k: v for k, v in row.items() if k in COLUMNS}


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    upsert_rows(path, [_row(ds, v) for ds in SETS for v in VARIANTS])
    return read_rows(path)


def _grid_line(table: str, variant: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {variant} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_grid_has_one_row_per_variant_and_one_column_per_dataset(rows):
    table = grid_table(rows, "emocomics35")
    header = table.splitlines()[4]
    assert header == (
        "| variant | kind | method | emoart/test macro-F1 [95% CI] "
        "| emocomics35/test macro-F1 [95% CI] |"
    )
    body = [ln.split(" | ")[0].lstrip("| ") for ln in table.splitlines()[6:] if ln.startswith("|")]
    # references first (base, then the constant predictor), then stages in curriculum order
    assert body == ["base", "trivial-majority", "emoart", "emocomics35", "ties", "linear"]
    # the baseline carries no mark; forgetting on emoart and the target score side by side
    assert _grid_line(table, "emocomics35") == [
        "emocomics35",
        "stage",
        "",
        "0.200 [0.100, 0.300]",
        "0.306 [0.259, 0.368]",
    ]
    assert _grid_line(table, "emoart") == [
        "emoart",
        "stage",
        "",
        "0.600 [0.400, 0.800] *",
        "0.039 [0.014, 0.060] *",
    ]
    assert _grid_line(table, "trivial-majority")[1:] == [
        "trivial",
        "",
        "0.050 [0.000, 0.100] *",
        "0.040 [0.020, 0.060] *",
    ]


def test_the_mark_follows_the_adjusted_p(rows):
    table = grid_table(rows, "emocomics35")
    ties, linear = _grid_line(table, "ties"), _grid_line(table, "linear")
    if HOLM:  # raw 0.02 / 0.0199 but Holm 0.08 / 0.0597: not significant after adjustment
        assert ties[3:] == ["0.450 [0.300, 0.600]", "0.242 [0.167, 0.285]"]
        assert linear[3:] == ["0.350 [0.200, 0.500] *", "0.340 [0.280, 0.400]"]
        assert "p < 0.05 in the paired test vs `emocomics35`, Holm-adjusted" in table
        assert "raw p" not in table
    else:
        assert ties[3:] == ["0.450 [0.300, 0.600] *", "0.242 [0.167, 0.285] *"]
        assert "raw p (unadjusted for multiple comparisons" in table


def test_raw_p_only_when_no_adjusted_value(rows):
    raw_only = [{k: v for k, v in r.items() if not k.endswith("_p_holm")} for r in rows]
    table = grid_table(raw_only, "emocomics35")
    assert _grid_line(table, "ties")[3:] == ["0.450 [0.300, 0.600] *", "0.242 [0.167, 0.285] *"]
    assert "raw p (unadjusted for multiple comparisons: no Holm-adjusted p" in table
    ties = [r for r in rows if r["variant"] == "ties" and r["dataset"] == "emoart"]
    if HOLM:
        assert significance(ties, "macro_f1") == (False, "holm")
    assert significance(
        [{k: v for k, v in ties[0].items() if k != "macro_f1_p_holm"}], "macro_f1"
    ) == (True, "raw")
    baseline = [r for r in rows if r["variant"] == "emocomics35"]
    assert significance(baseline, "macro_f1") == (False, "")


def test_caption_states_what_every_interval_rests_on(rows):
    table = grid_table(rows, "emocomics35")
    assert table.startswith(
        "### tiny — variant × dataset (value [bootstrap 95% interval], seed 0; "
    )
    assert "emoart/test: macro-F1 (n = 10 items in 10 groups; 1000 bootstrap replicates)" in table
    books = " from 4 books" if BOOKS else ""
    assert (
        f"emocomics35/test: macro-F1 (n = 47 utterances on 16 pages{books}; "
        "1000 bootstrap replicates)"
    ) in table


def test_lowrank_merge_shows_its_rank_and_error(rows):
    method = _grid_line(grid_table(rows, "emocomics35"), "ties")[2]
    assert method == ("ties (rank 8, 14% err)" if LOWRANK else "ties")
    assert _grid_line(grid_table(rows, "emocomics35"), "linear")[2] == "linear"


def test_p_at_the_bootstrap_floor(rows):
    trivial = next(
        r for r in rows if r["variant"] == "trivial-majority" and r["dataset"] == "emoart"
    )
    assert trivial["macro_f1_p"] == "0.000999001"  # as the CSV holds it
    assert format_p(trivial, "macro_f1_p") == "< 0.001"
    assert format_p({"macro_f1_p": "0.00497512", "n_boot": "200"}, "macro_f1_p") == "< 0.005"
    # above the floor, or without n_boot to know it: the value itself
    assert format_p({"macro_f1_p": "0.002", "n_boot": "1000"}, "macro_f1_p") == "0.002"
    assert format_p({"macro_f1_p": "0.000999001"}, "macro_f1_p") == "0.000999"
    # an exact (McNemar) p below the floor is not rounded up to it
    assert format_p({"macro_f1_p": "1e-05", "n_boot": "1000"}, "macro_f1_p") == "1e-05"
    table = markdown_table(rows, "emocomics35")
    holm = " 0.005 |" if HOLM else ""  # 5/1001, above the floor
    assert (
        "| trivial-majority | trivial |  | 0.050 [0.000, 0.100] | 0.150 | < 0.001 |" + holm
    ) in table.splitlines()
    assert "0.000999" not in table


def test_full_table_has_the_grid_then_each_set(rows):
    table = markdown_table(rows, "emocomics35")
    heads = [ln for ln in table.splitlines() if ln.startswith("### ")]
    assert [h.split(" (")[0] for h in heads] == [
        "### tiny — variant × dataset",
        "### tiny — emoart/test",
        "### tiny — emocomics35/test",
    ]
    assert "n = 47 utterances on 16 pages" in heads[2] and "seeds 0" in heads[2]
    # one evaluation set: no grid, the per-set table as before
    single = markdown_table([r for r in rows if r["dataset"] == "emocomics35"], "emocomics35")
    assert "variant × dataset" not in single and single.startswith("### tiny — emocomics35/test")


def _points(ax) -> dict[int, tuple[float, str, str]]:
    """y → (x, marker, face colour) of the variant markers of one panel."""
    out = {}
    for line in ax.get_lines():
        if line.get_marker() in ("o", "D") and len(line.get_xdata()) == 1:
            out[int(line.get_ydata()[0])] = (
                float(line.get_xdata()[0]),
                line.get_marker(),
                str(line.get_markerfacecolor()),
            )
    return out


def test_plot_has_one_panel_per_dataset_with_shared_rows(rows, tmp_path):
    import matplotlib.pyplot as plt

    from emomerge.experiment.plots import grid_figure, plot_grid

    fig = grid_figure(rows, "emocomics35")
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["tiny — emoart/test", "tiny — emocomics35/test"]
        names = ["base", "trivial-majority", "emoart", "emocomics35", "ties", "linear"]
        # the variant names label the first panel; the others share its rows
        assert [t.get_text() for t in axes[0].get_yticklabels()] == names
        assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
        for ax, ds in zip(axes, SETS):
            assert list(ax.get_yticks()) == list(range(len(names)))
            assert ax.get_xlabel() == "macro-F1 (95% CI)"
            points = _points(ax)
            assert {y: x for y, (x, _, _) in points.items()} == pytest.approx(
                {i: SCORES[ds][n][0] for i, n in enumerate(names)}
            )
            assert points[1][1:] == ("D", "none")  # the constant predictor: hollow, neutral
            assert points[2][1] == "o"
            dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
            assert len(dashed) == 1
            assert dashed[0].get_xdata()[0] == pytest.approx(SCORES[ds]["emocomics35"][0])
            marks = {round(t.xy[1]) for t in ax.texts if t.get_text() == "*"}
            sig = {
                i
                for i, n in enumerate(names)
                if n != "emocomics35" and SCORES[ds][n][4 if HOLM else 3] < 0.05
            }
            assert marks == sig
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == [
            "base",
            "trivial",
            "stage",
            "merged",
            "emocomics35 (baseline)",
            "p < 0.05 vs baseline" + (" (Holm-adjusted)" if HOLM else " (raw p)"),
        ]
    finally:
        plt.close(fig)
    png = plot_grid(rows, tmp_path / "plot.png", "emocomics35")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_dataset_plot_keeps_one_panel(rows, tmp_path):
    import matplotlib.pyplot as plt

    from emomerge.experiment.plots import grid_figure

    fig = grid_figure([r for r in rows if r["dataset"] == "emoart"], "emocomics35")
    try:
        assert len(fig.axes) == 1 and not math.isnan(_points(fig.axes[0])[0][0])
    finally:
        plt.close(fig)
