"""Figures from a leaderboard: stage-wise lines with merged bars, the experiment's variant ×
dataset forest plot, and confusion matrices.

Layout of :func:`plot_leaderboard`: one panel per (dataset, architecture); x = 0 is the base,
x = 1..S the stage adapters in curriculum order (a line: how the score moves through the
curriculum), then one bar per merged variant to the right. Error bars are the bootstrap 95%
intervals from the CSV; the dashed line is the last stage, the default baseline of the paired test;
constant predictors (``kind`` trivial) are dotted grey lines, a floor rather than a contender.

Layout of :func:`plot_grid` (the experiment's ``plot.png``): one panel per evaluation set (columns)
and architecture (rows), each variant's headline metric with its interval on the same row in every
panel, coloured by kind, ``*`` beside the significant ones, a dashed line at the baseline's score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from emomerge.merging.errors import InputError

from .leaderboard import read_rows

#: Colour of each variant kind in :func:`plot_grid` (trivial: a neutral, hollow reference).
KIND_COLOURS = {"base": "grey", "trivial": "0.6", "single-stage": "tab:green",
                "stage": "tab:blue", "merged": "tab:orange", "chain-ablation": "tab:purple",
                "merge-ablation": "tab:brown"}

#: Preferred metric for the figure when the user names none (first one present wins).
DEFAULT_METRICS = ("macro_f1", "example_f1", "char_f1", "exact_match", "accuracy")


def _num(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def _yerr(rows: Sequence[dict[str, str]], metric: str) -> np.ndarray:
    """[2, n] distances from the value to the interval bounds (0 where unknown)."""
    out = np.zeros((2, len(rows)))
    for i, r in enumerate(rows):
        v, lo, hi = _num(r[metric]), _num(r[f"{metric}_lo"]), _num(r[f"{metric}_hi"])
        if not any(math.isnan(x) for x in (v, lo, hi)):
            out[:, i] = (max(v - lo, 0.0), max(hi - v, 0.0))
    return out


def _stage_order(row: dict[str, str]) -> float:
    return _num(row["stage_index"]) if row.get("stage_index") else math.inf


def plot_leaderboard(paths: Sequence[str | Path], out: str | Path, *, metric: str | None = None,
                     dataset: str | None = None) -> Path:
    """Write the stage-line + merged-bars figure of the leaderboard(s) at ``paths`` to ``out``."""
    rows = [r for p in paths for r in read_rows(p)]
    if dataset is not None:
        rows = [r for r in rows if r["dataset"] == dataset]
    if not rows:
        raise InputError(f"{paths[0]}: no leaderboard rows to plot"
                         + (f" for dataset '{dataset}'" if dataset else ""))
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if any(r.get(m) for r in rows)), None)
        if metric is None:
            raise InputError(f"{paths[0]}: no metric values to plot")
    datasets = list(dict.fromkeys(f"{r['dataset']}/{r['split']}" for r in rows))
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    fig, axes = plt.subplots(len(datasets), len(archs), squeeze=False,
                             figsize=(4.5 * len(archs) + 1, 3.6 * len(datasets)))
    for i, ds in enumerate(datasets):
        for j, arch in enumerate(archs):
            sel = [r for r in rows if f"{r['dataset']}/{r['split']}" == ds
                   and r["architecture"] == arch]
            _panel(axes[i][j], sel, metric, f"{arch} — {ds}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _panel(ax, rows: list[dict[str, str]], metric: str, title: str) -> None:
    base = [r for r in rows if r["kind"] == "base"]
    stages = sorted((r for r in rows if r["kind"] == "stage"), key=_stage_order)
    merged = [r for r in rows if r["kind"] == "merged"]
    line = base[-1:] + stages
    xs = np.arange(len(line))
    if line:
        ax.errorbar(xs, [_num(r[metric]) for r in line], yerr=_yerr(line, metric), marker="o",
                    capsize=3, color="tab:blue", label="base → stages")
    if stages:
        ax.axhline(_num(stages[-1][metric]), ls="--", lw=0.8, color="tab:blue", alpha=0.6)
    bx = len(line) + 0.5 + np.arange(len(merged))
    if merged:
        ax.bar(bx, [_num(r[metric]) for r in merged], yerr=_yerr(merged, metric), capsize=3,
               color="tab:orange", alpha=0.8, width=0.7, label="merged")
    for x, r in zip(list(xs) + list(bx), line + merged):
        v = _num(r[metric])
        if not math.isnan(v):  # the number itself: a zero bar is otherwise invisible
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=6)
    for r in (r for r in rows if r["kind"] == "trivial"):
        v = _num(r[metric])
        if not math.isnan(v):  # a constant predictor: the floor a model has to clear
            ax.axhline(v, ls=":", lw=0.9, color=KIND_COLOURS["trivial"])
            ax.annotate(f"{r['variant']} {v:.3f}", (1.0, v), xycoords=("axes fraction", "data"),
                        xytext=(-2, 2), textcoords="offset points", ha="right", fontsize=6,
                        color="0.4")
    ax.set_xticks(list(xs) + list(bx))
    ax.set_xticklabels([r["variant"] for r in line + merged], rotation=35, ha="right",
                       fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")


def grid_figure(rows: list[dict], baseline: str) -> Any:
    """The figure of :func:`plot_grid` (the caller closes it): axes ``[architecture][set]``."""
    from .experiment_report import aggregate, grid, headline, significance

    grids = grid(rows)
    sets = list(dict.fromkeys(s for sets, _ in grids.values() for s in sets))
    n_max = max(len(variants) for _, variants in grids.values())
    fig, axes = plt.subplots(len(grids), len(sets), squeeze=False, sharey="row",
                             figsize=(1.8 + 4.2 * len(sets),
                                      (1.0 + 0.26 * n_max) * len(grids) + 0.4))
    kinds: set[str] = set()
    sources: set[str] = set()  # which p the marks read: "holm", "raw", "" (no p)
    for i, (arch, (_, variants)) in enumerate(grids.items()):
        names = list(variants)
        for j, (ds, task) in enumerate(sets):
            ax = axes[i][j]
            metric, header = headline(task)
            seeds = {len(by_ds[ds]) for by_ds in variants.values() if ds in by_ds}
            for y, name in enumerate(names):
                rs = variants[name].get(ds)
                if not rs:
                    continue
                mean, std = aggregate([_num(r.get(metric)) for r in rs])
                if math.isnan(mean):
                    continue
                kind = str(rs[0].get("kind") or "")
                kinds.add(kind)
                if len(rs) == 1:
                    lo, hi = _num(rs[0].get(f"{metric}_lo")), _num(rs[0].get(f"{metric}_hi"))
                    err = None if math.isnan(lo) or math.isnan(hi) else \
                        [[max(mean - lo, 0)], [max(hi - mean, 0)]]
                else:
                    err = [[std or 0], [std or 0]]
                colour = KIND_COLOURS.get(kind, "black")
                trivial = kind == "trivial"
                ax.errorbar([mean], [y], xerr=err, fmt="D" if trivial else "o", capsize=3,
                            color=colour, mfc="none" if trivial else colour, ms=4)
                sig, source = significance(rs, metric) if name != baseline else (False, "")
                sources.add(source)
                if sig:
                    right = mean + (err[1][0] if err else 0)
                    ax.annotate("*", (right, y), xytext=(3, -4), textcoords="offset points",
                                fontsize=9, color=colour)
            if baseline in variants and ds in variants[baseline]:
                ref, _ = aggregate([_num(r.get(metric)) for r in variants[baseline][ds]])
                if not math.isnan(ref):
                    ax.axvline(ref, ls="--", lw=0.8, color="tab:blue")
            lo, hi = ax.get_xlim()  # scores are >= 0: no negative axis when all sit at 0
            ax.set_xlim(max(lo, -0.02 * max(hi, 0.1)), max(hi, 0.1))
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_ylim(len(names) - 0.5, -0.5)  # first variant on top
            ax.grid(axis="x", alpha=0.3)
            ax.grid(axis="y", alpha=0.12)  # guides the eye along a variant's row across panels
            ax.set_xlabel(header + (" (95% CI)" if seeds == {1} else " (mean ± std over seeds)"),
                          fontsize=8)
            ax.set_title(f"{arch} — {ds}", fontsize=9)
    handles = [plt.Line2D([], [], marker="D" if k == "trivial" else "o", ls="", color=c,
                          mfc="none" if k == "trivial" else c, label=k)
               for k, c in KIND_COLOURS.items() if k in kinds]
    handles.append(plt.Line2D([], [], ls="--", lw=0.8, color="tab:blue",
                              label=f"{baseline} (baseline)"))
    marked = frozenset(sources - {""})
    which = {frozenset({"holm"}): " (Holm-adjusted)", frozenset({"raw"}): " (raw p)",
             frozenset(): ""}.get(marked, " (Holm-adjusted, else raw p)")
    handles.append(plt.Line2D([], [], marker="$*$", ls="", color="black",
                              label=f"p < 0.05 vs baseline{which}"))
    ncol = min(len(handles), 5)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    legend_inches = 0.1 + 0.18 * math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    return fig


def plot_grid(rows: list[dict], out: str | Path, baseline: str) -> Path:
    """Write :func:`grid_figure` of the leaderboard ``rows`` (as read back) to ``out``."""
    fig = grid_figure(rows, baseline)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_confusions(details_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """One confusion-matrix PNG per details JSON (single-label, or EmoComics35's single view)."""
    out_dir = Path(out_dir)
    written = []
    for path in sorted(Path(details_dir).glob("*.json")):
        info = json.loads(path.read_text())
        det = info.get("details", {})
        cm = det.get("confusion") or det.get("single_view", {}).get("confusion")
        if not cm:
            continue
        mat = np.array(cm["matrix"])
        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * mat.shape[1], 0.8 + 0.45 * mat.shape[0]))
        ax.imshow(mat, cmap="Blues")
        for (r, c), v in np.ndenumerate(mat):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > mat.max() / 2 else "black")
        ax.set_xticks(range(mat.shape[1]), cm["columns"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(mat.shape[0]), cm["labels"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(f"{info.get('variant')} — {info.get('dataset')}/{info.get('split')}",
                     fontsize=8)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{path.stem}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
