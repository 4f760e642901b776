"""Figures from a leaderboard: the variant × dataset forest plot and confusion matrices.

Layout of :func:`grid_figure` (the experiment's ``plot.png`` and ``leaderboard plot``): one panel
per evaluation set (columns) and architecture (rows), each variant's headline metric with its
interval on the same row in every panel, coloured by kind, ``*`` beside the significant ones
(Holm-adjusted p where the rows have it), a dashed line at the baseline's score (in the legend),
and a caption with n, seeds and bootstrap replicates per set. Constant predictors (``kind``
trivial) are hollow grey diamonds, a floor rather than a contender.
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

from emomerge.evaluation.leaderboard import read_rows
from emomerge.merging.atomic import atomic_file
from emomerge.merging.errors import InputError

#: Colour of each variant kind in :func:`plot_grid` (trivial: a neutral, hollow reference).
KIND_COLOURS = {
    "base": "grey",
    "trivial": "0.6",
    "single-stage": "tab:green",
    "stage": "tab:blue",
    "merged": "tab:orange",
    "chain-ablation": "tab:purple",
    "merge-ablation": "tab:brown",
}


def _save(fig: Any, out: Path, dpi: int) -> None:
    """The figure written whole or not at all (DESIGN.md, Outputs); the format from the name."""
    try:
        with atomic_file(out, "wb") as fh:
            fig.savefig(fh, dpi=dpi, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _num(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


#: Row kinds ``leaderboard plot --kinds`` may name (every kind a leaderboard row can have).
KINDS = tuple(KIND_COLOURS)


def majority_baseline(rows: Sequence[dict[str, str]]) -> str:
    """The variant the rows were paired-tested against (their ``baseline`` column; the most
    frequent one when leaderboards of several evaluations are plotted together)."""
    names = [r.get("baseline") or "" for r in rows if r.get("baseline")]
    return max(dict.fromkeys(names), key=names.count) if names else ""


def caption(rows: Sequence[dict[str, str]]) -> str:
    """What every interval of the figure rests on, per evaluation set: ``emoart/test: n = 10
    items in 10 groups; seeds 0; 1000 bootstrap replicates``."""
    from .report import _boot_note, grid, sample_note

    parts = []
    for sets, variants in grid(list(rows)).values():
        for ds, task in sets:
            set_rows = [r for by_ds in variants.values() for r in by_ds.get(ds, [])]
            seeds = sorted(
                {str(r.get("seed")) for r in set_rows if r.get("seed") != ""},
                key=lambda x: (len(x), x),
            )
            notes = [
                sample_note(set_rows, task),
                f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}" if seeds else "",
                _boot_note(set_rows),
            ]
            parts.append(f"{ds}: " + "; ".join(n for n in notes if n))
    return "\n".join(dict.fromkeys(parts))


def plot_leaderboard(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    metric: str | None = None,
    dataset: str | None = None,
    kinds: Sequence[str] | None = None,
) -> Path:
    """Write :func:`leaderboard_figure` to ``out``."""
    fig = leaderboard_figure(paths, metric=metric, dataset=dataset, kinds=kinds)
    out = Path(out)
    _save(fig, out, dpi=120)
    return out


def leaderboard_figure(
    paths: Sequence[str | Path],
    *,
    metric: str | None = None,
    dataset: str | None = None,
    kinds: Sequence[str] | None = None,
) -> Any:
    """The figure of the leaderboard(s) at ``paths`` (the caller closes it): :func:`grid_figure`,
    the experiment's own plot, with every row (``kinds`` keeps only those kinds, said in the
    title), a variant × dataset grid when several datasets are present, and a caption with n,
    seeds and bootstrap replicates per evaluation set."""
    rows = [r for p in paths for r in read_rows(p)]
    if dataset is not None:
        rows = [r for r in rows if r["dataset"] == dataset]
    if kinds:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise InputError(f"--kinds: unknown kind {unknown[0]!r} (one of {', '.join(KINDS)})")
        rows = [r for r in rows if r["kind"] in kinds]
    if not rows:
        raise InputError(
            f"{paths[0]}: no leaderboard rows to plot"
            + (f" for dataset '{dataset}'" if dataset else "")
            + (f" of kinds {', '.join(kinds)}" if kinds else "")
        )
    if metric is not None and not any(r.get(metric) for r in rows):
        raise InputError(f"--metric: no row has a value for '{metric}'")
    title = ", ".join(Path(p).parent.name + "/" + Path(p).name for p in paths)
    if kinds:
        title += f" — only {', '.join(kinds)}"
    return grid_figure(
        rows, majority_baseline(rows), metric=metric, title=title, caption=caption(rows)
    )


def grid_figure(
    rows: list[dict],
    baseline: str,
    *,
    metric: str | None = None,
    title: str | None = None,
    caption: str | None = None,
) -> Any:
    """The figure of :func:`plot_grid` (the caller closes it): axes ``[architecture][set]``.

    ``metric`` replaces each set's headline metric; ``title`` goes above the panels and
    ``caption`` (n, seeds, replicates) below the legend."""
    from .report import aggregate, grid, headline, significance

    grids = grid(rows)
    sets = list(dict.fromkeys(s for sets, _ in grids.values() for s in sets))
    n_max = max(len(variants) for _, variants in grids.values())
    fig, axes = plt.subplots(
        len(grids),
        len(sets),
        squeeze=False,
        sharey="row",
        figsize=(1.8 + 4.2 * len(sets), (1.0 + 0.26 * n_max) * len(grids) + 0.4),
    )
    kinds: set[str] = set()
    sources: set[str] = set()  # which p the marks read: "holm", "raw", "" (no p)
    for i, (arch, (_, variants)) in enumerate(grids.items()):
        names = list(variants)
        for j, (ds, task) in enumerate(sets):
            ax = axes[i][j]
            m, header = (metric, metric) if metric else headline(task)
            seeds = {len(by_ds[ds]) for by_ds in variants.values() if ds in by_ds}
            for y, name in enumerate(names):
                rs = variants[name].get(ds)
                if not rs:
                    continue
                mean, std = aggregate([_num(r.get(m)) for r in rs])
                if math.isnan(mean):
                    continue
                kind = str(rs[0].get("kind") or "")
                kinds.add(kind)
                if len(rs) == 1:
                    lo, hi = _num(rs[0].get(f"{m}_lo")), _num(rs[0].get(f"{m}_hi"))
                    err = (
                        None
                        if math.isnan(lo) or math.isnan(hi)
                        else [[max(mean - lo, 0)], [max(hi - mean, 0)]]
                    )
                else:
                    err = [[std or 0], [std or 0]]
                colour = KIND_COLOURS.get(kind, "black")
                trivial = kind == "trivial"
                ax.errorbar(
                    [mean],
                    [y],
                    xerr=err,
                    fmt="D" if trivial else "o",
                    capsize=3,
                    color=colour,
                    mfc="none" if trivial else colour,
                    ms=4,
                )
                sig, source = significance(rs, m) if name != baseline else (False, "")
                sources.add(source)
                if sig:
                    right = mean + (err[1][0] if err else 0)
                    ax.annotate(
                        "*",
                        (right, y),
                        xytext=(3, -4),
                        textcoords="offset points",
                        fontsize=9,
                        color=colour,
                    )
            if baseline in variants and ds in variants[baseline]:
                ref, _ = aggregate([_num(r.get(m)) for r in variants[baseline][ds]])
                if not math.isnan(ref):
                    ax.axvline(ref, ls="--", lw=0.8, color="tab:blue")
            lo, hi = ax.get_xlim()  # scores are >= 0: no negative axis when all sit at 0
            ax.set_xlim(max(lo, -0.02 * max(hi, 0.1)), max(hi, 0.1))
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_ylim(len(names) - 0.5, -0.5)  # first variant on top
            ax.grid(axis="x", alpha=0.3)
            ax.grid(axis="y", alpha=0.12)  # guides the eye along a variant's row across panels
            ax.set_xlabel(
                header + (" (95% CI)" if seeds == {1} else " (mean ± std over seeds)"), fontsize=8
            )
            ax.set_title(f"{arch} — {ds}", fontsize=9)
    handles = [
        plt.Line2D(
            [],
            [],
            marker="D" if k == "trivial" else "o",
            ls="",
            color=c,
            mfc="none" if k == "trivial" else c,
            label=k,
        )
        for k, c in KIND_COLOURS.items()
        if k in kinds
    ]
    handles.append(
        plt.Line2D([], [], ls="--", lw=0.8, color="tab:blue", label=f"{baseline} (baseline)")
    )
    marked = frozenset(sources - {""})
    which = {
        frozenset({"holm"}): " (Holm-adjusted)",
        frozenset({"raw"}): " (raw p)",
        frozenset(): "",
    }.get(marked, " (Holm-adjusted, else raw p)")
    handles.append(
        plt.Line2D([], [], marker="$*$", ls="", color="black", label=f"p < 0.05 vs baseline{which}")
    )
    ncol = min(len(handles), 5)
    caption_lines = caption.count("\n") + 1 if caption else 0
    caption_inches = 0.05 + 0.14 * caption_lines if caption else 0.0
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=ncol,
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, caption_inches / fig.get_figheight()),
    )
    if caption:
        fig.text(
            0.01,
            0.02 / fig.get_figheight(),
            caption,
            fontsize=6.5,
            color="0.3",
            va="bottom",
            ha="left",
        )
    legend_inches = 0.1 + 0.18 * math.ceil(len(handles) / ncol) + caption_inches
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top = 1 - 0.35 / fig.get_figheight()
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, top))
    return fig


def plot_grid(rows: list[dict], out: str | Path, baseline: str) -> Path:
    """Write :func:`grid_figure` of the leaderboard ``rows`` (as read back) to ``out``, with the
    :func:`caption` that ``leaderboard plot`` writes too."""
    fig = grid_figure(rows, baseline, caption=caption(rows))
    out = Path(out)
    _save(fig, out, dpi=120)
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
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > mat.max() / 2 else "black",
            )
        ax.set_xticks(range(mat.shape[1]), cm["columns"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(mat.shape[0]), cm["labels"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(
            f"{info.get('variant')} — {info.get('dataset')}/{info.get('split')}", fontsize=8
        )
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{path.stem}.png"
        _save(fig, target, dpi=110)
        written.append(target)
    return written
