"""Bootstrap intervals and paired tests, resampling *groups* of samples.

The resampling unit is ``Sample.group``: the page for EmoComics35 (the utterances of one page share
a picture, speakers and context, so they are not independent draws) and the sample itself
elsewhere. Each replicate draws as many groups as there are, with replacement, and takes all the
samples of every drawn group; the metric is recomputed on that multiset of samples.

- interval: the percentile 95% interval of the replicates (Efron's percentile bootstrap).
- paired bootstrap: both variants are scored on the *same* replicate indices; the two-sided
  p-value is the share of centred replicate differences at least as extreme as the observed one,
  ``(1 + #{|δ* − δ̂| ≥ |δ̂|}) / (B + 1)`` (the add-one keeps p > 0 for a finite B).
- McNemar: exact binomial test on the discordant pairs of per-sample correctness (scipy).
- Holm: the p-values of all variants tested against one baseline in one evaluation form a
  family; :func:`add_holm` adjusts them (Holm's step-down) so "significant" on the leaderboard
  controls the family-wise error rate, not the per-comparison one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

from .metrics import METRICS, Predictions, correctness
from .sufficient import replicate_values


def group_index(groups: Sequence[str]) -> list[np.ndarray]:
    """Sample indices of each group, groups in order of first appearance."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [np.asarray(v, dtype=int) for v in members.values()]


def replicate_indices(groups: Sequence[str], n_boot: int, seed: int) -> list[np.ndarray]:
    """``n_boot`` resampled index arrays (whole groups drawn with replacement), seeded."""
    members = group_index(groups)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in draws]


def weight_matrix(replicates: list[np.ndarray], n: int) -> np.ndarray:
    """[B, n]: how many times each sample is drawn in each replicate."""
    return np.stack([np.bincount(idx, minlength=n) for idx in replicates]).astype(float)


@dataclass(frozen=True)
class Estimate:
    """A metric value with its percentile bootstrap interval."""

    value: float
    lo: float
    hi: float


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    vals = values[~np.isnan(values)]
    if len(vals) == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(vals, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap(
    preds: Predictions,
    metrics: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    replicates: list[np.ndarray] | None = None,
) -> dict[str, Estimate]:
    """Each metric on all samples with its ``level`` interval from ``n_boot`` group resamples."""
    reps = replicates if replicates is not None else replicate_indices(preds.groups, n_boot, seed)
    weights = weight_matrix(reps, len(preds))
    full = np.arange(len(preds))
    out = {}
    for name in metrics:
        # the point value from the sklearn-based definition; replicates from the sufficient
        # statistics (identical numbers, checked in the tests, ~1000x faster)
        values = replicate_values(preds, name, weights)
        out[name] = Estimate(METRICS[name].fn(preds, full), *_percentiles(values, level))
    return out


def _check_paired(a: Predictions, b: Predictions) -> None:
    if a.ids != b.ids:
        raise ValueError("paired test needs both variants scored on the same samples, same order")


def paired_bootstrap(
    a: Predictions,
    b: Predictions,
    metric: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    replicates: list[np.ndarray] | None = None,
) -> tuple[float, float]:
    """(observed δ = metric(a) − metric(b), two-sided p-value) from a paired group bootstrap."""
    _check_paired(a, b)
    reps = replicates if replicates is not None else replicate_indices(a.groups, n_boot, seed)
    fn = METRICS[metric].fn
    full = np.arange(len(a))
    delta = fn(a, full) - fn(b, full)
    if np.isnan(delta):
        return float("nan"), float("nan")
    weights = weight_matrix(reps, len(a))
    deltas = replicate_values(a, metric, weights) - replicate_values(b, metric, weights)
    deltas = deltas[~np.isnan(deltas)]
    # Centre the replicates on 0 (the null of no difference) and count the ones at least as far
    # from 0 as the observed difference.
    extreme = np.sum(np.abs(deltas - delta) >= abs(delta) - 1e-12)
    return float(delta), float((1 + extreme) / (len(deltas) + 1))


def mcnemar(a: Predictions, b: Predictions) -> float:
    """Exact McNemar p-value on per-sample correctness (two-sided binomial on discordant pairs)."""
    _check_paired(a, b)
    ca, cb = correctness(a), correctness(b)
    only_a = int(np.sum((ca == 1) & (cb == 0)))
    only_b = int(np.sum((ca == 0) & (cb == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


# ---------------------------------------------------------------- multiple comparisons

#: The columns whose equal values make one family of tests for :func:`add_holm`: the variants
#: of one evaluation (same base, data, seed, settings) each tested against the same baseline.
#: ``base_id`` as in the leaderboard's row key: two bases evaluated alike into one folder are
#: two evaluations (each variant is tested against its own base), not one family.
HOLM_FAMILY = ("architecture", "base_id", "dataset", "split", "seed", "baseline", "config_hash")


def _as_p(value: Any) -> float | None:
    # a number, or a leaderboard cell ("0.0123"); None / "" / NaN: no test was made
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(p) else p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With the m non-NaN p-values sorted ascending, the i-th (0-based) becomes
    ``min(1, max_{j<=i} (m - j) p_(j))``: monotone in the raw p and capped at 1. NaN entries
    (a test that could not be made) stay NaN and do not count in m. statsmodels'
    ``multipletests(method="holm")`` computes the same; it is not a dependency of emomerge.
    """
    values = [float(p) for p in pvalues]
    order = sorted((i for i, p in enumerate(values) if not math.isnan(p)), key=lambda i: values[i])
    m = len(order)
    out = [float("nan")] * len(values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        out[i] = running
    return out


def add_holm(rows: list[dict[str, Any]]) -> None:
    """Fill ``{m}_p_holm`` from ``{m}_p`` in place, one Holm family per :data:`HOLM_FAMILY` key
    and metric.

    A family holds the rows of that key with a p-value for the metric; trivial-baseline rows
    (``kind == "trivial"``) are sanity checks, not candidates, so they neither enter a family nor
    get an adjusted p (their raw p stays). Rows without a p (the baseline's own row, McNemar's
    untested metrics) get none.
    """
    families: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "trivial":
            continue
        families.setdefault(tuple(row.get(k) for k in HOLM_FAMILY), []).append(row)
    for members in families.values():
        for m in METRICS:
            tested = [(r, p) for r in members if (p := _as_p(r.get(f"{m}_p"))) is not None]
            for (r, _), adjusted in zip(tested, holm([p for _, p in tested])):
                r[f"{m}_p_holm"] = adjusted
