"""Which entries survive, selected exactly without a dense τ_i: row blocks, top-k thresholds
by |value| and random keep masks (DESIGN.md, Merging).

- magnitude trimming (TIES, Breadcrumbs): the exact k-th largest |τ_i| without a sort. A random
  sample of entries, computed from the factors, brackets the threshold; one pass over the row
  blocks counts the entries above the bracket and collects the few inside it; the exact k-th value
  is selected among those. Ties at the threshold are kept by lower flat index, as
  ``sparsify.top_mask`` does. A bracket that missed is retried wider, then (practically never)
  the adapter falls back to a selection on the dense |τ_i|.
- random drops (DARE, DELLA): the masks, drawn from the adapter's generator in row-major order
  (the same stream as the dense path: ``torch.rand``/``torch.bernoulli`` consume it one draw per
  element), kept as bool for the mix, and the L1 sums of the ``rescale`` rule.

Each τ_i = L_i R_i is recomputed a row block at a time (``L_i[rows] @ R_i``, bit-identical to the
full product's rows; MKL's 1-row product is a gemv that rounds differently, so no block is 1 row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..methods import Sparsifier

_EPS = 1e-7  # sparsify.rescale_l1's guard
_SAMPLE = (1 << 14, 1 << 18)  # entries sampled per adapter to bracket the threshold (min, max)
_Z = (4.0, 16.0)  # bracket half-widths in standard errors: first pass, retry for a miss
_EXACT_BELOW = 1 << 20  # smaller tensors: select the threshold on the dense τ directly


def row_blocks(rows: int, block: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of about ``block`` rows; none is 1 row unless ``rows`` is 1."""
    block = max(2, block)
    edges = list(range(0, rows, block)) + [rows]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]  # fold a 1-row tail into the previous block
    return list(zip(edges[:-1], edges[1:]))


# -- exact top-k selections ------------------------------------------------------------------
@dataclass
class TopK:
    """The ``k`` largest |τ| of a tensor: entries with |τ| > ``t``, plus the ``ties`` (flat
    indices of entries equal to ``t`` that are kept, lower index first). ``everything``: k ≥ n."""

    t: float
    ties: torch.Tensor
    everything: bool = False
    nothing: bool = False
    kept_abs_sum: float = 0.0  # Σ|τ| over the kept entries (for rescale)
    total_abs_sum: float | None = None  # Σ|τ| over all entries (streamed selections, rescale)


def _topk_from_values(
    values: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Threshold, kept ties (flat indices) and the kept-candidates mask for the k largest of
    ``values`` (ascending ``index`` order), ties at the threshold by lower index."""
    t = torch.kthvalue(values, values.numel() - k + 1).values
    above = values > t
    need = k - int(above.sum())
    at = values == t
    keep_at = at & (torch.cumsum(at, 0) <= need)
    return float(t), index[keep_at], above | keep_at


def _select_candidates(
    values: np.ndarray, index: np.ndarray, need: int, sums: bool
) -> tuple[float, torch.Tensor, float]:
    """The ``need`` largest of the bracket's candidates (flat ``index`` ascending): threshold,
    kept ties (lower index first) and, when ``sums``, the kept values' Σ."""
    t = np.partition(values, values.size - need)[values.size - need]
    above = values > t
    at = np.flatnonzero(values == t)
    ties = index[at[: need - int(np.count_nonzero(above))]]
    kept_sum = float(values[above].sum(dtype=np.float64)) + float(t) * ties.size if sums else 0.0
    return float(t), torch.from_numpy(np.ascontiguousarray(ties)), kept_sum


def _descriptor_dense(a: torch.Tensor, k: int, *, sums: bool) -> TopK:
    n = a.numel()
    if k <= 0:
        return TopK(0.0, _EMPTY, nothing=True)
    if k >= n:
        return TopK(
            0.0,
            _EMPTY,
            everything=True,
            kept_abs_sum=float(a.sum(dtype=torch.float64)) if sums else 0.0,
        )
    flat = a.reshape(-1)
    t, ties, kept = _topk_from_values(flat, torch.arange(n), k)
    total = float(flat[kept].sum(dtype=torch.float64)) if sums else 0.0
    return TopK(t, ties, kept_abs_sum=total)


_EMPTY = torch.zeros(0, dtype=torch.long)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _sample_abs(L: torch.Tensor, R: torch.Tensor, count: int) -> np.ndarray:
    """|τ| at about ``count`` random positions, stratified by row (``kernels.sample_abs``),
    from the factors (approximate rounding)."""
    from .. import kernels

    m = L.shape[0]
    if m <= count:
        rows, per_row = np.arange(m, dtype=np.int64), count // m
    else:  # systematic: evenly spaced rows
        rows, per_row = (np.arange(count, dtype=np.int64) * m) // count, 1
    out = np.empty(rows.size * per_row, dtype=_np_dtype(L.dtype))
    kernels.sample_abs(L.contiguous().numpy(), R.T.contiguous().numpy(), rows, per_row, 0x5EED, out)
    return out


def _bracket(sample: np.ndarray, n: int, k: int, z: float = _Z[0]) -> tuple[float, float]:
    """[lo, hi] around the k-th largest |τ| of n entries: the sample's quantiles z binomial
    standard errors either side of the threshold's."""
    s = sample.size
    q = 1.0 - k / n  # fraction strictly below the threshold
    delta = z * math.sqrt(max(q * (1 - q), 1.0 / s) / s) + 2.0 / s
    lo_i, hi_i = math.floor((q - delta) * s), math.ceil((q + delta) * s)
    kth = [i for i in (lo_i, hi_i) if 0 <= i < s]
    if not kth:
        return 0.0, math.inf
    # order statistics lo_i, hi_i: select among the entries between a sub-sample's wider quantiles
    # (~5x cheaper than partitioning the whole sample), else from the whole sample
    sub = sample[: min(s, 4096)]
    pad = 8.0 * math.sqrt(max(q * (1 - q), 1.0 / sub.size) / sub.size) + delta
    a_i, b_i = (
        max(0, math.floor((q - pad) * sub.size)),
        min(sub.size - 1, math.ceil((q + pad) * sub.size)),
    )
    a, b = np.partition(sub, [a_i, b_i])[[a_i, b_i]]
    below = int(np.count_nonzero(sample < a))
    inside = sample[(sample >= a) & (sample <= b)]
    shifted = [i - below for i in kth]
    if all(0 <= i < inside.size for i in shifted):
        picked = dict(zip(kth, np.partition(inside, shifted)[shifted]))
    else:
        picked = dict(zip(kth, np.partition(sample, kth)[kth]))
    lo = float(picked[lo_i]) if lo_i >= 0 else 0.0
    hi = float(picked[hi_i]) if hi_i < s else math.inf
    return lo, hi


def _count_pass(L, R, blocks, brackets: list[tuple[float, float]], sums: bool, expect: list[int]):
    """One pass over the row blocks of τ = L R: per bracket (lo, hi) the count above hi, Σ|τ|
    above hi, and the entries inside it (values, flat indices); Σ|τ| of everything."""
    from .. import kernels

    n = R.shape[1]
    npd = _np_dtype(L.dtype)
    tau = torch.empty(max(r1 - r0 for r0, r1 in blocks), n, dtype=L.dtype)
    tau_np = tau.numpy()
    union = np.empty((n + 31) // 32, np.uint32)
    if not brackets and sums:  # Σ|τ| only: a bracket nothing falls into
        brackets, expect = [(math.inf, math.inf)], [0]
    state = [
        {
            "lo": kernels.as_scalar(lo, npd),
            "hi": kernels.as_scalar(hi, npd),
            "above": 0,
            "above_sum": 0.0,
            "pos": 0,
            "vals": np.empty((1, cap), npd),
            "idx": np.empty((1, cap), np.int64),
        }
        for (lo, hi), cap in zip(brackets, expect)
    ]
    total = 0.0
    for r0, r1 in blocks:
        torch.matmul(L[r0:r1], R, out=tau[: r1 - r0])
        for j, st in enumerate(state):
            while True:
                above, pos, above_sum, block_total = kernels.bracket_count(
                    tau_np,
                    r1 - r0,
                    st["lo"],
                    st["hi"],
                    st["vals"],
                    st["idx"],
                    st["pos"],
                    r0 * n,
                    sums,
                    union,
                )
                if pos <= st["vals"].shape[1]:
                    break
                grow = max(
                    2 * st["vals"].shape[1], pos + 4096
                )  # too few slots: grow, redo the block
                st["vals"] = _grow(st["vals"], grow)
                st["idx"] = _grow(st["idx"], grow)
            st["above"] += above
            st["above_sum"] += above_sum
            st["pos"] = pos
            if j == 0:
                total += block_total
    found = [
        (st["above"], st["above_sum"], st["vals"][0, : st["pos"]], st["idx"][0, : st["pos"]])
        for st in state
        if not math.isinf(float(st["lo"]))
    ]
    return found, total


def _grow(a: np.ndarray, cols: int) -> np.ndarray:
    """``a`` ``[rows, c]`` with room for ``cols`` columns (kept contents)."""
    out = np.empty((a.shape[0], cols), a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _stats_magnitude(L, R, ks: list[int], rescale: bool, blocks, exact_below: int) -> list[TopK]:
    """Exact top-k descriptors of |L R| for each k (one pass over the row blocks; a second,
    wider one for a k whose bracket missed, then a dense selection)."""
    m, n = L.shape[0], R.shape[1]
    numel = m * n
    if numel <= exact_below:
        a = (L @ R).abs_()
        return [_descriptor_dense(a, k, sums=rescale) for k in ks]
    out: list[TopK | None] = [None] * len(ks)
    for j, k in enumerate(ks):
        if k <= 0:
            out[j] = TopK(0.0, _EMPTY, nothing=True)
    todo = [j for j, k in enumerate(ks) if 0 < k < numel]
    sample = _sample_abs(L, R, min(max(_SAMPLE[0], numel >> 8), _SAMPLE[1])) if todo else None
    total = None
    for z in _Z:
        if not todo and (total is not None or not rescale):
            break
        brackets = [_bracket(sample, numel, ks[j], z) for j in todo]
        expect = [int(numel * min(1.0, 4 * z * math.sqrt(0.25 / sample.size))) + 4096 for _ in todo]
        found, pass_total = _count_pass(L, R, blocks, brackets, rescale, expect)
        total = pass_total if total is None else total
        missed = []
        for j, (lo_hi, (above, above_sum, values, index)) in zip(todo, zip(brackets, found)):
            need = ks[j] - above
            if need < 0 or need > values.size:  # the sample's bracket missed this k
                missed.append(j)
            elif need == 0:
                out[j] = TopK(lo_hi[1], _EMPTY, kept_abs_sum=above_sum)
            else:
                t, ties, kept_sum = _select_candidates(values, index, need, rescale)
                out[j] = TopK(t, ties, kept_abs_sum=above_sum + kept_sum)
        todo = missed
    if todo:  # practically never: select on the dense |τ|
        dense_a = (L @ R).abs_()
        for j in todo:
            out[j] = _descriptor_dense(dense_a, ks[j], sums=rescale)
    for j, k in enumerate(ks):
        if k >= numel:
            out[j] = TopK(0.0, _EMPTY, everything=True, kept_abs_sum=total or 0.0)
    if rescale:
        for d in out:
            d.total_abs_sum = total
    return out


def _stats_random(
    L, R, shape, spec: dict, gen: torch.Generator, blocks
) -> tuple[torch.Tensor, float, float]:
    """Draw the adapter's keep mask in row-major order (the dense path's stream) and the L1 sums."""
    m, n = shape
    mask = torch.empty(m, n, dtype=torch.bool)
    before = after = 0.0
    for r0, r1 in blocks:
        if spec["kind"] is Sparsifier.RANDOM_DROP:
            u = torch.rand(r1 - r0, n, generator=gen, dtype=L.dtype)
            torch.lt(u, spec["p"], out=mask[r0:r1])
            tau = L[r0:r1] @ R if spec["rescale"] is True else None
        else:  # della: per-row magnitude ranks → keep probabilities (sparsify.della_magprune)
            tau = L[r0:r1] @ R
            ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).to(tau.dtype)
            rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
            probs = (spec["p"] - spec["eps"]) + rank_norm * (2 * spec["eps"])
            mask[r0:r1] = torch.bernoulli(probs, generator=gen).bool()
            if not spec["rescale"]:
                tau = None
        if tau is not None:
            before += float(tau.abs().sum(dtype=torch.float64))
            after += float((tau * mask[r0:r1]).abs().sum(dtype=torch.float64))
    return mask, before, after


def _ratio(before: float, after: float, dtype) -> torch.Tensor | None:
    if before < _EPS or after < _EPS:
        return None
    return torch.tensor(before / after, dtype=dtype)
