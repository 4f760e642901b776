"""The experiment's outputs: one leaderboard CSV, the markdown table (mean ± std over seeds) and
a forest plot of every variant with its interval.

Table cells: with one seed, ``value [lo, hi]`` (the bootstrap 95% interval); with several,
``mean ± std`` over the seeds (sample standard deviation, ddof = 1) and the p-values of each
seed's paired test against the baseline, separated by ``/``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .leaderboard import fmt_value, read_rows, upsert_rows

#: Columns of the printed table per task: (metric, header); the first one carries its interval.
TABLE_METRICS = {
    "multi": (("macro_f1", "macro-F1"), ("example_f1", "example-F1"),
              ("subset_accuracy", "subset acc")),
    "single": (("macro_f1", "macro-F1"), ("accuracy", "accuracy")),
    "vqa": (("char_f1", "char-F1"), ("exact_match", "exact match")),
}
KIND_ORDER = ("base", "single-stage", "stage", "merged", "chain-ablation", "merge-ablation")


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


def _p_cell(rows: list[dict], metric: str) -> str:
    ps = [_num(r.get(f"{metric}_p")) for r in rows]
    if all(math.isnan(p) for p in ps):
        return "—"
    return " / ".join("" if math.isnan(p) else f"{p:.3g}" for p in ps)


def _groups(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, list[dict]]]:
    """(architecture, dataset/split, task) → variant → rows over seeds (variant order kept)."""
    out: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for r in rows:
        key = (str(r["architecture"]), f"{r['dataset']}/{r['split']}", str(r["task"]))
        out.setdefault(key, {}).setdefault(str(r["variant"]), []).append(r)
    for key, by_variant in out.items():
        out[key] = dict(sorted(by_variant.items(), key=lambda kv: (
            KIND_ORDER.index(kv[1][0]["kind"]) if kv[1][0]["kind"] in KIND_ORDER else 99)))
    return out


def markdown_table(rows: list[dict], baseline: str) -> str:
    """One markdown table per (architecture, evaluation set), then which merges beat the baseline."""
    parts = []
    for (arch, ds, task), by_variant in _groups(rows).items():
        metrics = TABLE_METRICS.get(task, TABLE_METRICS["single"])
        seeds = sorted({str(r["seed"]) for rs in by_variant.values() for r in rs})
        head_metric = metrics[0][0]
        note = ("bootstrap 95% interval in brackets" if len(seeds) == 1
                else f"mean ± std over seeds {', '.join(seeds)}; p per seed")
        parts.append(f"### {arch} — {ds} (seeds {', '.join(seeds)}; {note}; "
                     f"p: paired {head_metric} test vs `{baseline}`)\n")
        header = ["variant", "kind", "method",
                  f"{metrics[0][1]} [95% CI]" if len(seeds) == 1 else f"{metrics[0][1]}",
                  *(h for _, h in metrics[1:]), f"p vs {baseline}"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for name, rs in by_variant.items():
            cells = [name, rs[0]["kind"], rs[0].get("method") or ""]
            cells += [_cell(rs, m, i == 0) for i, (m, _) in enumerate(metrics)]
            cells.append("—" if name == baseline else _p_cell(rs, head_metric))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
        parts.append(verdict(by_variant, baseline, head_metric) + "\n")
    return "\n".join(parts)


def verdict(by_variant: dict[str, list[dict]], baseline: str, metric: str) -> str:
    """A sentence: which merges score above the baseline on ``metric``, and which significantly."""
    if baseline not in by_variant:
        return ""
    ref, _ = aggregate([_num(r.get(metric)) for r in by_variant[baseline]])
    merges = {n: rs for n, rs in by_variant.items() if rs[0]["kind"] == "merged"}
    above = []
    for name, rs in merges.items():
        mean, _ = aggregate([_num(r.get(metric)) for r in rs])
        if mean > ref:
            ps = [_num(r.get(f"{metric}_p")) for r in rs]
            sig = all(p < 0.05 for p in ps) and ps
            above.append(f"{name} ({mean:.3f}{', p < 0.05' if sig else ''})")
    if not merges:
        return ""
    if not above:
        return (f"No merge scores above `{baseline}` ({ref:.3f}) on {metric} "
                f"({len(merges)} merges).")
    return (f"{len(above)} of {len(merges)} merges score above `{baseline}` ({ref:.3f}) on "
            f"{metric}: {', '.join(above)}.")


def plot_forest(rows: list[dict], out: str | Path, baseline: str) -> Path:
    """Every variant's headline metric with its interval (one seed) or ± std (several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"base": "grey", "single-stage": "tab:green", "stage": "tab:blue",
               "merged": "tab:orange", "chain-ablation": "tab:purple",
               "merge-ablation": "tab:brown"}
    groups = _groups(rows)
    n_max = max(len(v) for v in groups.values())
    fig, axes = plt.subplots(1, len(groups), squeeze=False,
                             figsize=(6.5 * len(groups), 1.2 + 0.26 * n_max))
    for ax, ((arch, ds, task), by_variant) in zip(axes[0], groups.items()):
        metric, header = TABLE_METRICS.get(task, TABLE_METRICS["single"])[0]
        names = list(by_variant)
        for y, name in enumerate(names):
            rs = by_variant[name]
            mean, std = aggregate([_num(r.get(metric)) for r in rs])
            if len(rs) == 1:
                lo, hi = _num(rs[0].get(f"{metric}_lo")), _num(rs[0].get(f"{metric}_hi"))
                err = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if not math.isnan(lo) else None
            else:
                err = [[std or 0], [std or 0]]
            ax.errorbar([mean], [y], xerr=err, fmt="o", capsize=3,
                        color=colours.get(rs[0]["kind"], "black"))
        if baseline in by_variant:
            ref, _ = aggregate([_num(r.get(metric)) for r in by_variant[baseline]])
            ax.axvline(ref, ls="--", lw=0.8, color="tab:blue", label=f"{baseline} (baseline)")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(header + (" (95% CI)" if all(len(v) == 1 for v in by_variant.values())
                                else " (mean ± std over seeds)"))
        ax.set_title(f"{arch} — {ds}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k)
                   for k, c in colours.items()
                   if any(rs[0]["kind"] == k for rs in by_variant.values())]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=6, loc="best")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_leaderboard(path: Path, rows: list[dict]) -> Path:
    """The run's leaderboard: exactly this run's rows (a stale variant from an edit is gone)."""
    fd, tmp = tempfile.mkstemp(prefix=".leaderboard.", suffix=".csv", dir=path.parent)
    os.close(fd)
    Path(tmp).unlink()
    try:
        upsert_rows(tmp, rows)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_reports(result: Any, exp: Any, baseline: str) -> None:
    """leaderboard.csv, leaderboard.md and plot.png in the run folder; the table on ``result``."""
    out = result.out
    result.leaderboard = write_leaderboard(out / "leaderboard.csv", result.rows)
    rows = read_rows(result.leaderboard)  # the cells as written (strings, formatted floats)
    result.table = markdown_table(rows, baseline)
    result.markdown = out / "leaderboard.md"
    result.markdown.write_text(f"# {exp.spec.name}\n\n{result.table}", encoding="utf-8")
    result.plot = plot_forest(rows, out / "plot.png", baseline)


__all__ = ["aggregate", "fmt_value", "markdown_table", "plot_forest", "write_reports"]
