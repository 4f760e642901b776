"""The experiment's outputs: one leaderboard CSV, the markdown tables (mean ± std over seeds) and
a forest plot of every variant with its interval.

With several evaluation sets, the report opens with a variant × dataset grid per architecture:
one row per variant, one column per test split holding its headline metric (macro-F1 for the
classification sets, char-F1 for MangaVQA) with its interval and a significance mark, so what a
stage or merge forgets and transfers shows at a glance; the plot has one panel per dataset with
the variants on the same rows. The per-set tables with every metric follow.

Table cells: with one seed, ``value [lo, hi]`` (the bootstrap 95% interval); with several,
``mean ± std`` over the seeds (sample standard deviation, ddof = 1) and the p-values of each
seed's paired test against the baseline, separated by ``/``. A p at the paired bootstrap's floor
``1/(n_boot + 1)`` (no replicate as extreme as the observed difference) prints as ``< 0.001``.
``*`` marks a difference from the baseline with p < 0.05 in every seed: the Holm-adjusted p
(``{metric}_p_holm``) where the leaderboard has it, else the raw p, as the caption says.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emomerge.evaluation.leaderboard import fmt_value, read_rows, upsert_rows
from emomerge.evaluation.metrics import METRICS, REPORTED
from emomerge.merging.atomic import atomic_file

#: Columns of the printed table per task: (metric, header), from metrics.REPORTED and each
#: metric's label; the first one carries its interval and is the task's headline in the
#: variant × dataset grid.
TABLE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    task: tuple((name, METRICS[name].label) for name in names) for task, names in REPORTED.items()
}
#: Row order: references first (the base, constant predictors), then the trained variants.
KIND_ORDER = (
    "base",
    "trivial",
    "single-stage",
    "stage",
    "merged",
    "chain-ablation",
    "merge-ablation",
)
#: Significance level of the ``*`` mark.
ALPHA = 0.05
#: What ``n`` and ``n_groups`` count, per task (EmoComics35 resamples pages of utterances).
UNITS = {
    "multi": ("utterances", "on", "pages"),
    "single": ("items", "in", "groups"),
    "vqa": ("questions", "in", "groups"),
}


def _num(cell: Any) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def aggregate(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample std) of the finite values; std is None for fewer than two."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _cell(rows: list[dict], metric: str, interval: bool) -> str:
    if len(rows) == 1:
        r = rows[0]
        v = _num(r.get(metric))
        if math.isnan(v):
            return ""
        lo, hi = _num(r.get(f"{metric}_lo")), _num(r.get(f"{metric}_hi"))
        if interval and not (math.isnan(lo) or math.isnan(hi)):
            return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
        return f"{v:.3f}"
    mean, std = aggregate([_num(r.get(metric)) for r in rows])
    if math.isnan(mean):
        return ""
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def p_floor(row: dict) -> float | None:
    """The smallest p the row's paired bootstrap can give, ``1 / (n_boot + 1)``."""
    n_boot = _num(row.get("n_boot"))
    return None if math.isnan(n_boot) or n_boot < 1 else 1.0 / (n_boot + 1)


def format_p(row: dict, column: str) -> str:
    """A p cell: 3 significant digits, or ``< 0.001`` (``< 1/(n_boot+1)``) at the bootstrap floor.

    Only a p *equal* to the floor (as written, 6 significant digits) reads as "no replicate as
    extreme": an exact (McNemar) p below it is shown as it is.
    """
    p, floor = _num(row.get(column)), p_floor(row)
    if math.isnan(p):
        return ""
    if floor is not None and any(abs(p - f) <= 1e-9 * f for f in (floor, float(f"{floor:.6g}"))):
        return f"< {floor:.2g}"
    return f"{p:.3g}"


def _p_cell(rows: list[dict], metric: str, suffix: str = "_p") -> str:
    cells = [format_p(r, f"{metric}{suffix}") for r in rows]
    if not any(cells):
        return "—"
    return " / ".join(cells)


def significance(rows: list[dict], metric: str) -> tuple[bool, str]:
    """(whether every seed's difference from the baseline has p < :data:`ALPHA`, which p decided).

    The Holm-adjusted p when each row has one, else the raw p (``"holm"`` / ``"raw"``; ``""``
    when the rows carry no p at all, e.g. the baseline itself).
    """
    for suffix, source in (("_p_holm", "holm"), ("_p", "raw")):
        ps = [_num(r.get(f"{metric}{suffix}")) for r in rows]
        if ps and not any(math.isnan(p) for p in ps):
            return all(p < ALPHA for p in ps), source
    return False, ""


def _sig_note(sources: set[str], baseline: str) -> str:
    """The caption's account of the ``*`` mark, naming which p it was read from."""
    rule = f"`*`: p < {ALPHA:g} in the paired test vs `{baseline}`"
    if sources == {"holm"}:
        return f"{rule}, Holm-adjusted over the variants tested against it"
    if sources == {"raw"}:
        return (
            f"{rule}, raw p (unadjusted for multiple comparisons: no Holm-adjusted p in "
            "the leaderboard)"
        )
    if sources:
        return f"{rule}, Holm-adjusted where the leaderboard has it, else the raw p (unadjusted)"
    return f"no p-values vs `{baseline}`"


def method_label(row: dict) -> str:
    """The method, with a low-rank representation's rank and mean relative error:
    ``ties (rank 8, 14% err)``."""
    method = str(row.get("method") or "")
    if row.get("representation") != "lowrank":
        return method
    rank, err = _num(row.get("represented_rank")), _num(row.get("lowrank_error_mean"))
    info = [f"rank {rank:.0f}" if not math.isnan(rank) else "low rank"]
    if not math.isnan(err):
        info.append(f"{100 * err:.0f}% err")
    return f"{method} ({', '.join(info)})".strip()


def _span(values: list[float]) -> str:
    vals = sorted({int(v) for v in values if not math.isnan(v)})
    if not vals:
        return ""
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"


def sample_note(rows: list[dict], task: str) -> str:
    """What every interval of an evaluation set rests on: ``n = 47 utterances on 16 pages from
    4 books`` (books when the rows have ``n_books``)."""
    unit, on, group = UNITS.get(task, UNITS["single"])
    n = _span([_num(r.get("n")) for r in rows])
    if not n:
        return ""
    text = f"n = {n} {unit}"
    groups = _span([_num(r.get("n_groups")) for r in rows])
    if groups:
        text += f" {on} {groups} {group}"
    books = _span([_num(r.get("n_books")) for r in rows])
    if books:
        text += f" from {books} books"
    return text


def _boot_note(rows: list[dict]) -> str:
    boots = _span([_num(r.get("n_boot")) for r in rows])
    return f"{boots} bootstrap replicates" if boots else ""


def _kind_key(rows: list[dict]) -> int:
    kind = rows[0].get("kind")
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _groups(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, list[dict]]]:
    """(architecture, dataset/split, task) → variant → rows over seeds (variant order kept)."""
    out: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for r in rows:
        key = (str(r["architecture"]), f"{r['dataset']}/{r['split']}", str(r["task"]))
        out.setdefault(key, {}).setdefault(str(r["variant"]), []).append(r)
    for key, by_variant in out.items():
        out[key] = dict(sorted(by_variant.items(), key=lambda kv: _kind_key(kv[1])))
    return out


#: One architecture's grid: ([(dataset/split, task)], variant → dataset/split → rows over seeds).
Grid = tuple[list[tuple[str, str]], dict[str, dict[str, list[dict]]]]


def grid(rows: list[dict]) -> dict[str, Grid]:
    """architecture → its :data:`Grid`: the evaluation sets in first-seen order, the variants in
    :data:`KIND_ORDER` (stable, so the curriculum order of the stages is kept)."""
    out: dict[str, Grid] = {}
    groups = _groups(rows)
    for (arch, ds, task), by_variant in groups.items():
        sets, variants = out.setdefault(arch, ([], {}))
        # one split scored under two tasks: two columns, told apart by the task
        column = ds if sum(k[:2] == (arch, ds) for k in groups) == 1 else f"{ds} ({task})"
        sets.append((column, task))
        for name, rs in by_variant.items():
            variants.setdefault(name, {})[column] = rs
    for arch, (sets, variants) in out.items():
        out[arch] = (
            sets,
            dict(sorted(variants.items(), key=lambda kv: _kind_key(next(iter(kv[1].values()))))),
        )
    return out


def headline(task: str) -> tuple[str, str]:
    """(metric, header) of a task's one number in the grid and the plot."""
    return TABLE_METRICS.get(task, TABLE_METRICS["single"])[0]


def grid_table(rows: list[dict], baseline: str) -> str:
    """Per architecture, one row per variant and one column per evaluation set: the set's
    headline metric with its interval and ``*`` where it differs from the baseline."""
    parts = []
    for arch, (sets, variants) in grid(rows).items():
        seeds = sorted(
            {str(r["seed"]) for by_ds in variants.values() for rs in by_ds.values() for r in rs},
            key=lambda s: (len(s), s),
        )
        one_seed = len(seeds) == 1
        header = ["variant", "kind", "method"] + [
            f"{ds} {headline(task)[1]}" + (" [95% CI]" if one_seed else " (mean ± std)")
            for ds, task in sets
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        sources: set[str] = set()
        for name, by_ds in variants.items():
            first = next(iter(by_ds.values()))[0]
            cells = [name, str(first.get("kind") or ""), method_label(first)]
            for ds, task in sets:
                rs = by_ds.get(ds)
                if not rs:
                    cells.append("—")
                    continue
                metric = headline(task)[0]
                cell = _cell(rs, metric, True) or "—"
                if name != baseline:
                    sig, source = significance(rs, metric)
                    if source:
                        sources.add(source)
                    cell += " *" if sig else ""
                cells.append(cell)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        per_set = []
        for ds, task in sets:
            set_rows = [r for by_ds in variants.values() for r in by_ds.get(ds, [])]
            note = "; ".join(x for x in (sample_note(set_rows, task), _boot_note(set_rows)) if x)
            per_set.append(f"{ds}: {headline(task)[1]}" + (f" ({note})" if note else ""))
        cells_note = (
            "value [bootstrap 95% interval], seed " + seeds[0]
            if one_seed
            else f"mean ± std over seeds {', '.join(seeds)}"
        )
        parts.append(
            f"### {arch} — variant × dataset ({cells_note}; {_sig_note(sources, baseline)})\n"
        )
        parts.append("Headline metric per test split: " + "; ".join(per_set) + ".\n")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def markdown_table(rows: list[dict], baseline: str) -> str:
    """With several evaluation sets, the variant × dataset grid first; then one markdown table
    per (architecture, evaluation set) and which merges beat the baseline."""
    parts = []
    if any(len(sets) > 1 for sets, _ in grid(rows).values()):
        parts.append(grid_table(rows, baseline))
    for (arch, ds, task), by_variant in _groups(rows).items():
        metrics = TABLE_METRICS.get(task, TABLE_METRICS["single"])
        all_rows = [r for rs in by_variant.values() for r in rs]
        seeds = sorted({str(r["seed"]) for r in all_rows}, key=lambda s: (len(s), s))
        head_metric = metrics[0][0]
        holm = any(r.get(f"{head_metric}_p_holm") for r in all_rows)
        note = (
            "bootstrap 95% interval in brackets"
            if len(seeds) == 1
            else f"mean ± std over seeds {', '.join(seeds)}; p per seed"
        )
        about = "; ".join(
            x
            for x in (
                sample_note(all_rows, task),
                f"seeds {', '.join(seeds)}",
                note,
                _boot_note(all_rows),
            )
            if x
        )
        parts.append(
            f"### {arch} — {ds} ({about}; p: paired {head_metric} test vs "
            f"`{baseline}`"
            + ("; p (Holm): adjusted over the variants tested against it" if holm else "")
            + ")\n"
        )
        header = [
            "variant",
            "kind",
            "method",
            f"{metrics[0][1]} [95% CI]" if len(seeds) == 1 else f"{metrics[0][1]}",
            *(h for _, h in metrics[1:]),
            f"p vs {baseline}",
        ]
        header += ["p (Holm)"] if holm else []
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for name, rs in by_variant.items():
            cells = [name, rs[0]["kind"], method_label(rs[0])]
            cells += [_cell(rs, m, i == 0) for i, (m, _) in enumerate(metrics)]
            cells.append("—" if name == baseline else _p_cell(rs, head_metric))
            if holm:
                cells.append("—" if name == baseline else _p_cell(rs, head_metric, "_p_holm"))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
        parts.append(verdict(by_variant, baseline, head_metric) + "\n")
    return "\n".join(parts)


def verdict(by_variant: dict[str, list[dict]], baseline: str, metric: str) -> str:
    """A sentence: which merges score above the baseline on ``metric``, and which significantly
    (Holm-adjusted p when the rows have it)."""
    if baseline not in by_variant:
        return ""
    ref, _ = aggregate([_num(r.get(metric)) for r in by_variant[baseline]])
    merges = {n: rs for n, rs in by_variant.items() if rs[0]["kind"] == "merged"}
    above = []
    for name, rs in merges.items():
        mean, _ = aggregate([_num(r.get(metric)) for r in rs])
        if mean > ref:
            sig, source = significance(rs, metric)
            mark = f", {'Holm-adjusted ' if source == 'holm' else ''}p < {ALPHA:g}" if sig else ""
            above.append(f"{name} ({mean:.3f}{mark})")
    if not merges:
        return ""
    if not above:
        return f"No merge scores above `{baseline}` ({ref:.3f}) on {metric} ({len(merges)} merges)."
    return (
        f"{len(above)} of {len(merges)} merges score above `{baseline}` ({ref:.3f}) on "
        f"{metric}: {', '.join(above)}."
    )


def plot_forest(rows: list[dict], out: str | Path, baseline: str) -> Path:
    """Every variant's headline metric with its interval (one seed) or ± std (several): one
    panel per evaluation set, the variants on the same rows (see :func:`plots.plot_grid`)."""
    from .plots import plot_grid

    return plot_grid(rows, out, baseline)


def write_leaderboard(path: Path, rows: list[dict]) -> Path:
    """The run's leaderboard: exactly this run's rows (a stale variant from an edit is gone)."""
    return upsert_rows(path, rows, replace_all=True)


def write_reports(result: Any, exp: Any, baseline: str) -> None:
    """leaderboard.csv, leaderboard.md and plot.png in the run folder; the table on ``result``."""
    out = result.out
    result.leaderboard = write_leaderboard(out / "leaderboard.csv", result.rows)
    rows = read_rows(result.leaderboard)  # the cells as written (strings, formatted floats)
    result.table = markdown_table(rows, baseline)
    result.markdown = out / "leaderboard.md"
    with atomic_file(result.markdown) as fh:
        fh.write(f"# {exp.spec.name}\n\n{result.table}")
    result.plot = plot_forest(rows, out / "plot.png", baseline)


__all__ = [
    "aggregate",
    "fmt_value",
    "format_p",
    "grid",
    "grid_table",
    "markdown_table",
    "plot_forest",
    "significance",
    "write_reports",
]
