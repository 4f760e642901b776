"""The streamed merge of one module: all adapters at once, row block by row block.

Equal to ``engine.apply_method(method, tv.stacked(path), params)`` — identical trimming and
random masks, mixing equal to float rounding — without ever holding a dense ΔW per adapter:
each τ_i = L_i R_i is recomputed a row block at a time (``L_i[rows] @ R_i``, bit-identical to the
full product's rows; MKL's 1-row product is a gemv that rounds differently, so no block is 1 row).

Plain TIES (top-k trimming, no rescale, tensors above ``exact_below``) runs in **one** pass:
each block is tallied and mixed with a provisional threshold by one fused kernel, the positions
inside some threshold's bracket are recorded with their raw values, and once the exact
thresholds are selected among them only those whose keep decision changes are re-mixed
(``_Stream._single_pass_brackets``, ``resolve``). The element-wise work is done by the numba
kernels of ``kernels.py``. Every other streamed method (and a missed bracket) takes at most two
passes over the row blocks:

1. **stats** (only when a sparsifier needs a global quantity), one task per adapter:
   - magnitude trimming (ties, breadcrumbs): the exact k-th largest |τ_i| without a sort. A
     random sample of entries, computed from the factors, brackets the threshold; the pass counts
     the entries above the bracket and collects the few inside it; the exact k-th value is selected
     among those. Ties at the threshold are kept by lower flat index, as ``sparsify.top_mask``
     does. If the bracket missed (practically never) the adapter falls back to a full selection.
   - random drops (DARE, DELLA): the masks, drawn from the adapter's generator in row-major order
     (the same stream as the dense path: ``torch.rand``/``torch.bernoulli`` consume it one draw per
     element), kept as bool for pass 2, and the L1 sums of the ``rescale`` rule.
2. **mix**, row blocks split over worker threads: trim, weight, elect signs, mix, and send the
   block either into the dense output or into the projection ``Qᵀ D`` for adapter output.

Adapter output (``merge_factors``) re-factorises D without forming it: Q is an orthonormal basis
of the adapters' joint column space (the stacked L factors), ``Qᵀ D`` is accumulated block by
block in the mix pass, and its SVD gives L' = Q U_k S_k, R' = V_kᵀ. L'R' = P D for the orthogonal
projection P = (Q U_k)(Q U_k)ᵀ, so the relative error is exact without a second pass:
‖D − P D‖² = ‖D‖² − Σ_{j≤k} s_j². D's leading singular subspace lies (almost) in span(L) because
trimming and sign election leave a low-rank signal plus a diffuse remainder; the tests and
``benchmarks/merge_speed.py`` compare the error with ``lowrank.refactor`` on the dense D.
With ``--rank auto`` (``max_error``) D is streamed into a dense buffer and the rank chosen by
error (``lowrank.auto_rank``): ‖D − P_k D‖² = ‖P⊥D‖² + Σ_{j>k} s_j², the out-of-span residual
plus the in-basis tail; the basis is used only when ρ = ‖P⊥D‖/‖D‖ ≤ E/2, else D is re-factorised
by ``lowrank.refactor_auto``.
With ``refactor="best"`` (a fixed rank) D is streamed into a dense buffer too, and the projection
competes with a truncated SVD of D (exact when small, else randomized, its range finder started
from the projection's left singular directions): the one closer to D is kept (``_best_of``).

Worker threads run single-threaded torch ops on cache-sized blocks (a 2-core machine shared with
other jobs loses more to OpenMP barriers on small ops than it gains).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Factors = tuple[torch.Tensor, torch.Tensor]

#: methods the streamed path computes (with their dense-space parameters).
STREAMED = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
)
_CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
_EPS = 1e-7  # sparsify.rescale_l1's guard
_BLOCK_BYTES = 1 << 20  # one adapter's row block: ~1 MB keeps n blocks + buffers near L2
_STAGE_BYTES = 4 << 20  # merged rows gathered before each projection update (adapter output)
_SAMPLE = (1 << 14, 1 << 18)  # entries sampled per adapter to bracket the threshold (min, max)
_Z = (4.0, 16.0)  # bracket half-widths in standard errors: first pass, retry for a miss
_EXACT_BELOW = 1 << 20  # smaller tensors: select the threshold on the dense τ directly


def supports(method_name: str, resolved: dict[str, Any]) -> bool:
    """True when ``merge_dense``/``merge_factors`` compute this method with these parameters."""
    if method_name not in STREAMED or resolved.get("space", "dense") != "dense":
        return False
    return not (method_name == "ties" and resolved.get("paper"))


def default_workers() -> int:
    """Worker threads: the cores this process may use (affinity), at most torch's thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "before": 1}


@contextlib.contextmanager
def single_threaded_ops():
    """torch ops on one thread inside (process-wide; nested and concurrent uses are counted,
    the last one out restores the thread count)."""
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["before"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["before"])


_single_threaded_ops = single_threaded_ops


def _map(tasks: Sequence[Callable[[], Any]], workers: int) -> list:
    if workers <= 1 or len(tasks) <= 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(min(workers, len(tasks))) as pool:
        return list(pool.map(lambda t: t(), tasks))


def row_blocks(rows: int, block: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of about ``block`` rows; none is 1 row unless ``rows`` is 1."""
    block = max(2, block)
    edges = list(range(0, rows, block)) + [rows]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]  # fold a 1-row tail into the previous block
    return list(zip(edges[:-1], edges[1:]))


# -- exact top-k selections -------------------------------------------------------------------
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


def _topk_from_values(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Threshold, kept ties (flat indices) and the kept-candidates mask for the k largest of
    ``values`` (ascending ``index`` order), ties at the threshold by lower index."""
    t = torch.kthvalue(values, values.numel() - k + 1).values
    above = values > t
    need = k - int(above.sum())
    at = values == t
    keep_at = at & (torch.cumsum(at, 0) <= need)
    return float(t), index[keep_at], above | keep_at


def _select_candidates(values: np.ndarray, index: np.ndarray, need: int, sums: bool) -> tuple[float, torch.Tensor, float]:
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
        return TopK(0.0, _EMPTY, everything=True, kept_abs_sum=float(a.sum(dtype=torch.float64)) if sums else 0.0)
    flat = a.reshape(-1)
    t, ties, kept = _topk_from_values(flat, torch.arange(n), k)
    total = float(flat[kept].sum(dtype=torch.float64)) if sums else 0.0
    return TopK(t, ties, kept_abs_sum=total)


_EMPTY = torch.zeros(0, dtype=torch.long)
_NO_MASK = np.zeros((1, 1), dtype=bool)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _sample_abs(L: torch.Tensor, R: torch.Tensor, count: int) -> np.ndarray:
    """|τ| at about ``count`` random positions, stratified by row (``kernels.sample_abs``),
    from the factors (approximate rounding)."""
    from . import kernels

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
    a_i, b_i = max(0, math.floor((q - pad) * sub.size)), min(sub.size - 1, math.ceil((q + pad) * sub.size))
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


# -- sparsifier plans -------------------------------------------------------------------------
@dataclass
class _Plan:
    """How adapter i is sparsified in the mix pass (after the stats pass filled it in)."""

    kind: str  # "none" | "zero" | "topk" | "band" | "mask"
    keep: TopK | None = None  # topk / band: the kept top-k
    drop: TopK | None = None  # band: the dropped top-k (breadcrumbs' outliers)
    mask: torch.Tensor | None = None  # mask: bool [out, in]
    scale: torch.Tensor | None = None  # rescale factor (0-dim, dtype), applied after the mask
    divide: float | None = None  # bernoulli_inverse: ÷ density


def _plan_kind(name: str, resolved: dict, i: int, numel: int) -> tuple[str, dict]:
    density = resolved.get("density", [1.0] * (i + 1))[i]
    if name in ("linear", "task_arithmetic") or density >= 1:
        return "none", {}
    if name == "ties":
        return "magnitude", {"ks": [max(1, int(density * numel))], "rescale": resolved["rescale"]}
    if name.startswith("breadcrumbs"):
        target = int(density * numel)
        n_top = int(resolved["gamma"][i] * numel)
        n_bot = max(0, numel - target - n_top)
        return "magnitude", {"ks": [numel - n_bot, numel - n_bot - target], "rescale": resolved["rescale"]}
    if name.startswith("dare"):
        return "bernoulli", {"p": density, "rescale": resolved["rescale"]}
    if name.startswith("della"):
        return "della", {"p": density, "eps": resolved["epsilon"][i], "rescale": resolved["rescale"]}
    raise ValueError(f"{name}: not a streamed method")


def _count_pass(L, R, blocks, brackets: list[tuple[float, float]], sums: bool, expect: list[int]):
    """One pass over the row blocks of τ = L R: per bracket (lo, hi) the count above hi, Σ|τ|
    above hi, and the entries inside it (values, flat indices); Σ|τ| of everything."""
    from . import kernels

    n = R.shape[1]
    npd = _np_dtype(L.dtype)
    tau = torch.empty(max(r1 - r0 for r0, r1 in blocks), n, dtype=L.dtype)
    tau_np = tau.numpy()
    union = np.empty((n + 31) // 32, np.uint32)
    if not brackets and sums:  # Σ|τ| only: a bracket nothing falls into
        brackets, expect = [(math.inf, math.inf)], [0]
    state = [{"lo": kernels.as_scalar(lo, npd), "hi": kernels.as_scalar(hi, npd), "above": 0,
              "above_sum": 0.0, "pos": 0, "vals": np.empty((1, cap), npd), "idx": np.empty((1, cap), np.int64)}
             for (lo, hi), cap in zip(brackets, expect)]
    total = 0.0
    for r0, r1 in blocks:
        torch.matmul(L[r0:r1], R, out=tau[: r1 - r0])
        for j, st in enumerate(state):
            while True:
                above, pos, above_sum, block_total = kernels.bracket_count(
                    tau_np, r1 - r0, st["lo"], st["hi"], st["vals"], st["idx"], st["pos"], r0 * n, sums, union)
                if pos <= st["vals"].shape[1]:
                    break
                grow = max(2 * st["vals"].shape[1], pos + 4096)  # too few slots: grow, redo the block
                st["vals"] = _grow(st["vals"], grow)
                st["idx"] = _grow(st["idx"], grow)
            st["above"] += above
            st["above_sum"] += above_sum
            st["pos"] = pos
            if j == 0:
                total += block_total
    found = [(st["above"], st["above_sum"], st["vals"][0, : st["pos"]], st["idx"][0, : st["pos"]])
             for st in state if not math.isinf(float(st["lo"]))]
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


def _stats_random(L, R, shape, spec: dict, gen: torch.Generator, blocks) -> tuple[torch.Tensor, float, float]:
    """Draw the adapter's keep mask in row-major order (the dense path's stream) and the L1 sums."""
    m, n = shape
    mask = torch.empty(m, n, dtype=torch.bool)
    before = after = 0.0
    for r0, r1 in blocks:
        if spec["kind"] == "bernoulli":
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


# -- the streamed merge -----------------------------------------------------------------------
class _Stream:
    def __init__(self, name: str, factors: Sequence[Factors | None], shape: tuple[int, int],
                 resolved: dict, generators: Sequence[torch.Generator] | None, *, workers: int,
                 block_rows: int | None, exact_below: int):
        self.name, self.factors, self.shape, self.resolved = name, list(factors), tuple(shape), resolved
        self.n = len(self.factors)
        self.dtype = next((f[0].dtype for f in self.factors if f is not None), torch.float32)
        self.workers = workers
        m, n = self.shape
        rows = block_rows or max(2, _BLOCK_BYTES // (n * torch.finfo(self.dtype).bits // 8))
        self.blocks = row_blocks(m, rows)
        self.weights = [float(w) for w in resolved["weight"]]
        self.w = torch.tensor(self.weights, dtype=self.dtype)  # as apply_method builds it
        self.generators, self.exact_below = generators, exact_below
        self.single = self._single_pass_brackets()
        if self.single is None:
            self.plans = self._stats(generators, exact_below)
        self._args = [self._kernel_args(i) for i in range(self.n)]

    # -- the single pass (plain magnitude trimming) ------------------------------------------
    def _single_pass_brackets(self) -> list | None:
        """Per adapter (lo, hi, k) — or None for an adapter that is absent or kept whole — when
        every adapter is trimmed by plain top-k (TIES without rescale) on a large tensor; else None.

        Then the mix runs once: each block is mixed with the provisional plans "keep |τ| > t̂"
        (t̂: the bracket's middle) while ``kernels.tally_mix`` counts the entries above each
        bracket and records every position some adapter's bracket holds, with the raw values of
        all adapters there. After the pass the exact thresholds are selected among those
        positions and only the ones whose keep decision can change are re-mixed (``resolve``):
        the same kept entries and the same arithmetic as the two passes, without the first pass.
        """
        numel = self.shape[0] * self.shape[1]
        if numel <= self.exact_below or self.name not in _CONSENSUS:
            return None
        kinds = [_plan_kind(self.name, self.resolved, i, numel) if f is not None else ("zero", {})
                 for i, f in enumerate(self.factors)]
        if any(kind not in ("zero", "none") and not (kind == "magnitude" and len(spec["ks"]) == 1
                                                    and not spec["rescale"]) for kind, spec in kinds):
            return None
        if all(kind != "magnitude" for kind, _ in kinds):
            return None

        def bracket(i):
            kind, spec = kinds[i]
            if kind != "magnitude" or spec["ks"][0] >= numel:
                return None
            L, R = self.factors[i]
            sample = _sample_abs(L, R, min(max(_SAMPLE[0], numel >> 8), _SAMPLE[1]))
            lo, hi = _bracket(sample, numel, spec["ks"][0])
            mid = float(np.dtype(_np_dtype(self.dtype)).type(lo + (hi - lo) / 2))
            return lo, hi, spec["ks"][0], sample.size, mid

        found = _map([lambda i=i: bracket(i) for i in range(self.n)], self.workers)
        self.plans = [
            _Plan("zero") if kind == "zero" else
            _Plan("none") if b is None else _Plan("topk", keep=TopK(b[4], _EMPTY))
            for (kind, _), b in zip(kinds, found)
        ]
        return found

    def _tally_state(self, n_rows: int) -> dict:
        numel = self.shape[0] * self.shape[1]
        npd = _np_dtype(self.dtype)
        as_s = np.dtype(npd).type
        frac = max((4 * _Z[0] * math.sqrt(0.25 / b[3]) for b in self.single if b is not None), default=0.0)
        rows_here = n_rows / self.shape[0]
        cap = int(numel * rows_here * min(1.0, frac)) + 4096
        ucap = min(int(cap * sum(b is not None for b in self.single)), int(numel * rows_here) + 1)
        n = self.shape[1]
        lam = self.resolved["lambda"]
        return {
            "lo": np.array([b[0] if b else math.inf for b in self.single], npd),
            "hi": np.array([b[1] if b else math.inf for b in self.single], npd),
            "active": np.array([b is not None for b in self.single]),
            # provisional plans: keep |τ| > t̂ (kept whole: > −1; absent: zeros anyway)
            "keep_t": np.array([b[4] if b else -1.0 for b in self.single], npd),
            "c2": self.w.numpy(), "use_c2": np.array([w != 1.0 for w in self.weights]),
            "above": np.zeros(self.n, np.int64),
            "uidx": np.empty(ucap, np.int64), "uraw": np.empty((self.n, ucap), npd),
            "upos": np.zeros(1, np.int64), "union": np.empty((n + 31) // 32, np.uint32),
            "flags": np.zeros((n + 7) // 8 * 8, np.uint8),
            "mix": (self.w.numpy(), bool(self.resolved["normalize"]), min(self.weights) > 0, as_s(lam),
                    lam != 1, np.empty(n, npd), np.empty(n, npd), np.empty(n, npd)),
        }

    def _tally_mix(self, st: dict, ys: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> None:
        """``kernels.tally_mix`` of one block; if a buffer was short, grow it and redo the block
        (from the products: the kernel overwrote them)."""
        from . import kernels

        b = r1 - r0
        while True:
            saved = st["above"].copy(), st["upos"].copy()
            kernels.tally_mix(ys.numpy(), b, r0 * self.shape[1], st["lo"], st["hi"], st["active"],
                              st["keep_t"], st["c2"], st["use_c2"], st["above"], st["uidx"], st["uraw"],
                              st["upos"], st["union"], st["flags"], out.numpy(), *st["mix"])
            if st["upos"][0] <= st["uidx"].size:
                return
            st["above"][:], st["upos"][:] = saved
            ucap = max(2 * st["uidx"].size, int(st["upos"][0]) + 4096)
            st["uidx"], st["uraw"] = _grow(st["uidx"][None], ucap)[0], _grow(st["uraw"], ucap)
            for i in range(self.n):
                self._product(i, r0, r1, ys[i, :b])

    def resolve(self, tallies: list[dict]):
        """After the single pass: the exact plans, and the uncertain positions (flat, ascending)
        where the exact merged value differs from the provisional one, with both values.
        None when a bracket missed (the caller then runs the two passes).

        Only the positions where some adapter's keep decision can change
        (``kernels.decisions_differ``: a small part of the brackets' union) are mixed again,
        under both plans, with the block path's kernels."""
        from . import kernels

        # the uncertain positions: whole (C-contiguous) buffers and a count, so the kernels see
        # contiguous rows (a column slice of [n, cap] would stop their vectorisation)
        count = sum(int(t["upos"][0]) for t in tallies)
        if len(tallies) == 1:
            uidx, uraw = tallies[0]["uidx"], tallies[0]["uraw"]
        else:
            uidx = np.concatenate([t["uidx"][: t["upos"][0]] for t in tallies])
            uraw = np.concatenate([t["uraw"][:, : t["upos"][0]] for t in tallies], axis=1)
        exact = []
        for i, b in enumerate(self.single):
            if b is None:
                exact.append(self.plans[i])
                continue
            above = sum(int(t["above"][i]) for t in tallies)
            values, index = np.empty(count, uraw.dtype), np.empty(count, np.int64)
            got = kernels.bracket_candidates(uraw[i], count, uraw.dtype.type(b[0]), uraw.dtype.type(b[1]),
                                             uidx, values, index)  # this adapter's candidates
            values, index = values[:got], index[:got]
            need = b[2] - above
            if need < 0 or need > values.size:
                return None
            if need == 0:
                exact.append(_Plan("topk", keep=TopK(b[1], _EMPTY)))
            else:
                t, ties, _ = _select_candidates(values, index, need, False)
                exact.append(_Plan("topk", keep=TopK(t, ties)))
        npd = _np_dtype(self.dtype)
        active = np.array([b is not None for b in self.single])
        provisional_t = np.array([p.keep.t if a else 0.0 for p, a in zip(self.plans, active)], npd)
        exact_t = np.array([p.keep.t if a else 0.0 for p, a in zip(exact, active)], npd)
        raw_out, index_out = np.empty((self.n, count), uraw.dtype), np.empty(count, np.int64)
        got = kernels.decisions_differ(uraw, uidx, count, provisional_t, exact_t, active, raw_out, index_out)
        uidx, uraw = index_out[:got], raw_out[:, :got]  # _mix_points mixes copies in place
        provisional = self._mix_points(uraw.copy(), uidx, self.plans)
        self.plans = exact
        self._args = [self._kernel_args(i) for i in range(self.n)]
        final = self._mix_points(uraw, uidx, exact)
        changed = final != provisional  # entries between t̂ and the exact threshold, and ties
        return torch.from_numpy(uidx)[changed], final[changed], provisional[changed]

    def _mix_points(self, raw: np.ndarray, index: np.ndarray, plans: list[_Plan]) -> torch.Tensor:
        """Mix the raw τ values ``raw[:, p]`` at flat positions ``index`` under ``plans`` with the
        block path's very kernels (one row of P entries; ties mapped to their positions)."""
        p = index.size
        ys = torch.from_numpy(np.ascontiguousarray(raw)).reshape(self.n, 1, p)  # mixed in place
        keep = self.plans, self._args
        self.plans = plans
        self._args = [self._kernel_args(i) for i in range(self.n)]
        try:
            out = torch.empty(1, p, dtype=self.dtype)
            self._combine(ys, 1, out, lambda i: _positions(plans[i], index))
        finally:
            self.plans, self._args = keep
        return out[0]

    def two_pass(self) -> None:
        """Leave the single pass: exact plans from a stats pass (``_stats``)."""
        self.single = None
        self.plans = self._stats(self.generators, self.exact_below)
        self._args = [self._kernel_args(i) for i in range(self.n)]

    def _stats(self, generators, exact_below) -> list[_Plan]:
        numel = self.shape[0] * self.shape[1]
        tasks = []
        for i, f in enumerate(self.factors):
            kind, spec = _plan_kind(self.name, self.resolved, i, numel)
            if f is None:
                tasks.append(lambda: _Plan("zero"))
            elif kind == "none":
                tasks.append(lambda: _Plan("none"))
            elif kind == "magnitude":
                tasks.append(lambda f=f, spec=spec: self._magnitude_plan(f, spec, exact_below))
            else:
                spec = {**spec, "kind": kind}
                tasks.append(lambda f=f, spec=spec, g=generators[i]: self._random_plan(f, spec, g))
        return _map(tasks, self.workers)

    def _magnitude_plan(self, f: Factors, spec: dict, exact_below: int) -> _Plan:
        ks, rescale = spec["ks"], spec["rescale"]
        descs = _stats_magnitude(f[0], f[1], ks, rescale, self.blocks, exact_below)
        keep = descs[0]
        drop = descs[1] if len(descs) > 1 else None
        scale = None
        if rescale:
            total = keep.total_abs_sum
            if total is None:  # dense selection: Σ|τ| of everything
                total = float((f[0] @ f[1]).abs().sum(dtype=torch.float64))
            kept = keep.kept_abs_sum - (drop.kept_abs_sum if drop is not None and not drop.nothing else 0.0)
            scale = _ratio(total, kept, self.dtype)
        if drop is None:
            if keep.everything:
                return _Plan("none", scale=scale)
            if keep.nothing:
                return _Plan("zero")
            return _Plan("topk", keep=keep, scale=scale)
        if keep.nothing or (drop.everything):
            return _Plan("zero")
        return _Plan("band", keep=keep, drop=drop, scale=scale)

    def _random_plan(self, f: Factors, spec: dict, gen: torch.Generator) -> _Plan:
        mask, before, after = _stats_random(f[0], f[1], self.shape, spec, gen, self.blocks)
        if spec["kind"] == "bernoulli" and spec["rescale"] == "density":
            return _Plan("mask", mask=mask, divide=spec["p"])
        scale = _ratio(before, after, self.dtype) if spec["rescale"] else None
        return _Plan("mask", mask=mask, scale=scale)

    # -- the mix pass -------------------------------------------------------------------------
    def _kernel_args(self, i: int) -> tuple | None:
        """``kernels.select``'s per-adapter arguments (None: nothing to do after the product)."""
        plan, npd = self.plans[i], _np_dtype(self.dtype)
        as_s = lambda v: np.dtype(npd).type(v)  # noqa: E731
        scale = plan.scale is not None and plan.divide is None
        weight = self.weights[i] != 1.0 and plan.divide is None
        mode, keep_t, drop_t = 0, -1.0, math.inf
        if plan.kind == "topk":
            mode, keep_t = 1, plan.keep.t
        elif plan.kind == "band":
            mode = 2
            keep_t = -1.0 if plan.keep.everything else plan.keep.t
            drop_t = math.inf if plan.drop.nothing else plan.drop.t
        elif plan.kind == "mask":
            mode = 3
        if mode == 0 and not scale and not weight:
            return None
        c1 = plan.scale.item() if plan.scale is not None else 1.0
        return (mode, as_s(keep_t), as_s(drop_t), as_s(c1), scale, as_s(self.weights[i]), weight)

    def _product(self, i: int, r0: int, r1: int, y: torch.Tensor) -> None:
        """τ_i rows [r0, r1) into ``y`` (zeros for an absent adapter)."""
        if self.plans[i].kind == "zero":
            y.zero_()
        else:
            f = self.factors[i]
            torch.matmul(f[0][r0:r1], f[1], out=y)

    def _sparsify(self, i: int, y: torch.Tensor, ties: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor | None) -> None:
        """τ_i (a block of ``y``) → sparsified and weighted, in place (``kernels.select``);
        ``ties``: local flat positions of the kept and dropped threshold ties."""
        from . import kernels

        plan = self.plans[i]
        if plan.kind == "zero":
            return
        args = self._args[i]
        if args is not None:
            mode, keep_t, drop_t, c1, use_c1, c2, use_c2 = args
            kernels.select(y.numpy(), y.shape[0], mode, keep_t, drop_t, ties[0].numpy(), ties[1].numpy(),
                           mask.numpy() if mode == 3 else _NO_MASK, c1, use_c1, c2, use_c2)
        if plan.divide is not None:  # DARE's 1/p: eager, then the multiplications in order
            y.div_(plan.divide)
            if plan.scale is not None:
                y.mul_(plan.scale)
            if self.weights[i] != 1.0:
                y.mul_(self.w[i])

    def _block_ties(self, i: int, r0: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan, base = self.plans[i], r0 * self.shape[1]
        keep = _local(plan.keep.ties, base, size) if plan.keep is not None else _EMPTY
        drop = _local(plan.drop.ties, base, size) if plan.drop is not None and not plan.drop.nothing else _EMPTY
        return keep, drop

    def _combine(self, ys: torch.Tensor, b: int, out: torch.Tensor, ties, masks=None) -> None:
        """Sparsify each ``ys[i, :b]`` (raw τ) and mix them into ``out[:b]``."""
        from . import kernels

        for i in range(self.n):
            self._sparsify(i, ys[i, :b], ties(i), masks(i) if masks else None)
        yb, ob = ys[:, :b], out[:b]
        if self.name == "linear":
            torch.sum(yb, 0, out=ob)
            if self.resolved["normalize"]:
                ob.div_(self.w.sum())
        elif self.name not in _CONSENSUS:
            torch.sum(yb, 0, out=ob)
            self._finish(ob, None)
        else:
            npd = _np_dtype(self.dtype)
            lam = self.resolved["lambda"]
            rowbufs = [np.empty(ys.shape[2], npd) for _ in range(3)]
            kernels.consensus(ys.numpy(), b, out.numpy(), self.w.numpy(), bool(self.resolved["normalize"]),
                              min(self.weights) > 0, np.dtype(npd).type(lam), lam != 1, *rowbufs)

    def mix_rows(self, blocks, sink: Callable[[int, int, torch.Tensor], None],
                 target: Callable[[int, int], torch.Tensor] | None = None) -> dict | None:
        """Mix the row blocks ``blocks`` and hand each merged block to ``sink(r0, r1, block)``.
        ``target(r0, r1)``: where to write a block (a contiguous ``[r1 - r0, in]`` view; default
        a buffer of this call). In the single pass, also tally them: returns the tally for
        ``resolve``."""
        n_rows = max(r1 - r0 for r0, r1 in blocks)
        cols = self.shape[1]
        ys = torch.empty(self.n, n_rows, cols, dtype=self.dtype)  # [n_adapters, rows, in]
        if target is None:
            buffer = torch.empty(n_rows, cols, dtype=self.dtype)
            target = lambda r0, r1: buffer[: r1 - r0]  # noqa: E731
        tally = self._tally_state(sum(r1 - r0 for r0, r1 in blocks)) if self.single else None
        for r0, r1 in blocks:
            b = r1 - r0
            for i in range(self.n):
                self._product(i, r0, r1, ys[i, :b])
            out = target(r0, r1)
            if tally is not None:
                self._tally_mix(tally, ys, r0, r1, out)
            else:
                self._combine(ys, b, out, lambda i: self._block_ties(i, r0, b * cols),
                              lambda i: None if self.plans[i].mask is None else self.plans[i].mask[r0:r1])
            sink(r0, r1, out)
        return tally

    def _finish(self, ob, _):
        # _gta without consensus: ÷ Σw (guarded) when normalising, × λ
        if self.resolved.get("normalize"):
            divisor = self.w.view(-1, 1, 1).sum(dim=0)
            divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
            ob.div_(divisor[0, 0])
        lam = self.resolved.get("lambda", 1.0)
        if lam != 1:
            ob.mul_(lam)

    def split(self) -> list[list[tuple[int, int]]]:
        """The row blocks as contiguous runs, one per worker."""
        w = max(1, min(self.workers, len(self.blocks)))
        per = math.ceil(len(self.blocks) / w)
        return [self.blocks[s:s + per] for s in range(0, len(self.blocks), per)]


def _positions(plan: _Plan, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan's kept threshold ties as positions in ``index`` (flat, ascending; all ties are
    among them: they sit inside the bracket)."""
    if plan.keep is None or plan.keep.ties.numel() == 0:
        return _EMPTY, _EMPTY
    ties = plan.keep.ties.numpy()
    return torch.from_numpy(np.searchsorted(index, ties).astype(np.int64)), _EMPTY


def _local(index: torch.Tensor, base: int, size: int) -> torch.Tensor:
    if index.numel() == 0:
        return _EMPTY
    sel = index[(index >= base) & (index < base + size)]
    return sel - base


def merge_dense(
    method_name: str, factors: Sequence[Factors | None], shape: tuple[int, int], resolved: dict,
    *, generators: Sequence[torch.Generator] | None = None, workers: int | None = None,
    block_rows: int | None = None, exact_below: int = _EXACT_BELOW, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged update of one module, dense ``[out, in]``, from each adapter's factors.

    ``factors[i]``: ``(L_i, R_i)`` with L_i R_i = τ_i, or None (τ_i = 0). ``resolved``: the
    method's resolved parameters (``engine.resolve_params``). ``generators``: one per adapter,
    seeded as ``engine.apply_method`` seeds them (random methods only).
    """
    workers = workers or default_workers()
    with _single_threaded_ops():
        st = _Stream(method_name, factors, shape, resolved, generators, workers=workers,
                     block_rows=block_rows, exact_below=exact_below)
        result = out if out is not None else torch.empty(shape, dtype=st.dtype)

        def sink(r0, r1, block):  # the blocks are written in place
            pass

        def target(r0, r1):
            return result[r0:r1]

        tallies = _map([lambda run=run: st.mix_rows(run, sink, target) for run in st.split()], workers)
        if st.single is not None:
            fixed = st.resolve(tallies)
            if fixed is None:  # a bracket missed: the two passes
                st.two_pass()
                _map([lambda run=run: st.mix_rows(run, sink, target) for run in st.split()], workers)
            else:
                index, exact, _ = fixed
                result.view(-1)[index] = exact
    return result


def merge_factors(
    method_name: str, factors: Sequence[Factors | None], shape: tuple[int, int], resolved: dict,
    rank: int | None, *, generators: Sequence[torch.Generator] | None = None, workers: int | None = None,
    block_rows: int | None = None, exact_below: int = _EXACT_BELOW, oversample: int = 8,
    refactor_generator: torch.Generator | None = None, max_error: float | None = None,
    info: dict | None = None, refactor: str = "projection",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors ``(L', R')`` of the merged update and the exact relative error
    ‖D − L'R'‖_F / ‖D‖_F, without forming D (see the module docstring).

    Falls back to ``lowrank.refactor`` on the streamed dense D when the adapters' joint basis is
    too small to hold rank + ``oversample`` directions or D is small.

    ``refactor="best"`` (fixed rank): D is formed, and the projection competes with a truncated
    SVD of D (``_best_of``); ``info`` then also receives ``projection_error``.

    ``max_error`` (``--rank auto``; ``rank`` is then ignored): the smallest rank whose error is
    ≤ E (``lowrank.auto_rank``). D is streamed into a dense buffer (one pass) and projected on the
    adapters' joint basis; that basis is used when its out-of-span residual ρ is ≤
    ``lowrank.AUTO_SPAN``·E, else ``lowrank.refactor_auto`` re-factorises D (randomized or exact
    SVD). ``info`` (if given) receives ``refactor`` (``projection`` | ``svd`` | ``randomized
    svd``), ``basis`` (its size) and ``out_of_span`` (ρ).
    """
    from . import kernels
    from .lowrank import REFACTORS
    from .lowrank import refactor as refactor_dense

    m, n = shape
    if refactor not in REFACTORS:
        raise ValueError(f"refactor must be one of {REFACTORS}, got {refactor!r}")
    if max_error is not None:
        return _merge_factors_auto(method_name, factors, shape, resolved, max_error, generators=generators,
                                   workers=workers, block_rows=block_rows, exact_below=exact_below,
                                   refactor_generator=refactor_generator, info=info)
    k = min(rank, m, n)
    present = [f for f in factors if f is not None]
    basis_cols = sum(f[0].shape[1] for f in present)
    dtype = present[0][0].dtype if present else torch.float32
    if not present:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0
    if refactor == "best":
        dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                            workers=workers, block_rows=block_rows, exact_below=exact_below)
        return _best_of(dense, _joint_basis(present, dtype), k, generator=refactor_generator, info=info)
    if basis_cols < k + oversample or basis_cols >= min(m, n) // 2:
        dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                            workers=workers, block_rows=block_rows, exact_below=exact_below)
        return refactor_dense(dense, rank, generator=refactor_generator, info=info)
    workers = workers or default_workers()
    q = _joint_basis(present, dtype)
    if q.shape[1] < k + oversample:
        dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                            workers=workers, block_rows=block_rows, exact_below=exact_below)
        return refactor_dense(dense, rank, generator=refactor_generator, info=info)
    with _single_threaded_ops():
        st = _Stream(method_name, factors, shape, resolved, generators, workers=workers,
                     block_rows=block_rows, exact_below=exact_below)

        # merged rows are staged until ~4 MB (≥ 64 rows) before Qᵀ D is accumulated: a thin
        # block (13 rows of a 18944-wide down_proj) would re-read and re-write all of Qᵀ D
        stage_rows = max(64, _STAGE_BYTES // (n * torch.finfo(dtype).bits // 8))

        # The error is ‖D‖² − Σ s_j² (a difference of two large numbers when it is small), so
        # both terms are accumulated in float64: in float32 the sum of squares of a 2^20-element
        # tensor loses ~1e-5 of its value, which read as an error below the best rank-k one.
        q64 = q.double()

        def run_rows(run):
            proj = torch.zeros(q.shape[1], n, dtype=torch.float64)  # Qᵀ D of these rows
            stage = torch.empty(stage_rows + max(r1 - r0 for r0, r1 in run), n, dtype=dtype)
            held = [run[0][0], 0]  # first staged row, staged count
            norm2 = [0.0]

            def flush():
                if held[1]:
                    proj.addmm_(q64[held[0]:held[0] + held[1]].T, stage[: held[1]].double())
                held[0], held[1] = held[0] + held[1], 0

            def target(r0, r1):  # blocks are mixed straight into the stage
                return stage[held[1]: held[1] + r1 - r0]

            def sink(r0, r1, block):
                held[1] += r1 - r0
                norm2[0] += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
                if held[1] >= stage_rows:
                    flush()

            tally = st.mix_rows(run, sink, target)
            flush()
            return proj, norm2[0], tally

        parts = _map([lambda run=run: run_rows(run) for run in st.split()], workers)
        fixed = st.resolve([t for _, _, t in parts]) if st.single is not None else None
        if st.single is not None and fixed is None:  # a bracket missed: the two passes
            st.two_pass()
            parts = _map([lambda run=run: run_rows(run) for run in st.split()], workers)
    proj = sum(p for p, _, _ in parts)  # [q, in], float64
    norm2 = sum(s for _, s, _ in parts)
    if fixed is not None:  # the uncertain positions: exact value − provisional value
        index, exact, provisional = fixed
        delta = exact.double() - provisional.double()
        correction = np.zeros((n, q.shape[1]))
        kernels.scatter_project(correction, q.numpy(), (index // n).numpy(), (index % n).numpy(), delta.numpy())
        proj += torch.from_numpy(correction).T
        norm2 += float((exact.double() ** 2).sum() - (provisional.double() ** 2).sum())
    if norm2 == 0.0:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0
    # top-k of the small core from its Gram matrix: proj projᵀ = U S² Uᵀ
    s2, u = _core(proj)
    from .lowrank import out_of_span

    _note(info, "projection", q.shape[1], out_of_span(s2, norm2))
    return _projected_factors(q, proj, s2, u, norm2, k, dtype)


def _best_of(dense: torch.Tensor, q: torch.Tensor, k: int, *, generator: torch.Generator | None,
             info: dict | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``refactor="best"``: of two rank-k factorisations of the dense merged update D, the one
    closer to D (a tie keeps the projection), with its error measured on the product.

    - the projection, as the streamed path computes it: L' = Q U_k S_k, R' = V_kᵀ from the SVD of
      the core Qᵀ D (Q: the adapters' joint basis; skipped when Q has fewer than k columns);
    - the truncated SVD of D (``lowrank.refactor``): exact for a small D — the Eckart–Young
      optimum, which the projection can only tie — else randomized, its range finder started from
      the projection's left singular directions Q U_k plus random columns and refined by power
      iterations: subspace iteration from the projection's subspace, so in practice no worse.

    ``info`` receives ``refactor`` (the winner: ``projection`` | ``svd`` | ``randomized svd``)
    and ``projection_error`` (None when the basis could not hold rank k).
    """
    from .lowrank import out_of_span, refactor, relative_error

    m, n = dense.shape
    if q.shape[1] < k:  # the projection cannot reach rank k: the SVD alone
        svd = refactor(dense, k, generator=generator, info=info)
        _record(info, None)
        return svd
    proj, norm2 = _project(q, dense)
    if norm2 == 0.0:
        _note(info, "projection", q.shape[1], 0.0)
        _record(info, 0.0)
        return torch.zeros(m, k, dtype=dense.dtype), torch.zeros(k, n, dtype=dense.dtype), 0.0
    s2, u = _core(proj)
    left, right, _ = _projected_factors(q, proj, s2, u, norm2, k, dense.dtype)
    error = relative_error(dense, left, right)
    how: dict = {}
    start = (q.double() @ u[:, :k]).to(dense.dtype)  # Q U_k: the projection's left directions
    svd = refactor(dense, k, generator=generator, info=how, start=start)
    if svd[2] < error:
        _note(info, how["refactor"], None, None)
        _record(info, error)
        return svd
    _note(info, "projection", q.shape[1], out_of_span(s2, norm2))
    _record(info, error)
    return left, right, error


def _record(info: dict | None, projection_error: float | None) -> None:
    if info is not None:
        info["projection_error"] = projection_error


def _project(q: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Qᵀ D and ‖D‖², accumulated in float64 as the streamed path does, ~4 MB of D's rows at a
    time (no float64 copy of D)."""
    m, n = dense.shape
    rows = max(64, _STAGE_BYTES // (8 * n))
    q64 = q.double()
    proj = torch.zeros(q.shape[1], n, dtype=torch.float64)
    norm2 = 0.0
    for r0 in range(0, m, rows):
        block = dense[r0:r0 + rows].double()
        proj.addmm_(q64[r0:r0 + rows].T, block)
        norm2 += float(torch.linalg.vector_norm(block)) ** 2
    return proj, norm2


def _joint_basis(present: Sequence[Factors], dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal basis Q = L_all W of the adapters' joint column space, W from the Gram matrix
    (float64; dependent columns — shared lineage factors — are dropped): Qᵀ D = Wᵀ (L_allᵀ D)."""
    l_all = torch.cat([f[0] for f in present], dim=1)  # [out, Σr]
    lam, vec = torch.linalg.eigh(l_all.T.double() @ l_all.double())
    keep = lam > lam.max() * 1e-10
    w = vec[:, keep] / lam[keep].sqrt()  # [Σr, q]
    return (l_all.double() @ w).to(dtype)  # [out, q]


def _core(proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (descending, ≥ 0) and left singular vectors of ``proj`` = Qᵀ D
    (float64), from its Gram matrix."""
    s2, u = torch.linalg.eigh(proj @ proj.T)
    return s2.flip(0).clamp_min(0), u.flip(1)


def _projected_factors(q, proj, s2, u, norm2: float, k: int, dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """L' = Q U_k S_k, R' = V_kᵀ = S_k⁻¹ U_kᵀ (Qᵀ D), and the exact error ‖D‖² − Σ_{j≤k} s_j²."""
    n = proj.shape[1]
    s2, u = s2[:k], u[:, :k]
    sv = s2.sqrt()
    nz = sv > 0
    right = torch.zeros(k, n, dtype=torch.float64)
    right[nz] = (u[:, nz].T @ proj) / sv[nz, None]
    left = (q.double() @ (u * sv)).to(dtype)
    right = right.to(dtype)
    err2 = max(0.0, norm2 - float(s2.sum()))
    return left, right, math.sqrt(err2 / norm2)


def _note(info: dict | None, how: str, basis: int | None, rho: float | None) -> None:
    if info is not None:
        info["refactor"] = how
        info.update({k: v for k, v in (("basis", basis), ("out_of_span", rho)) if v is not None})


def _merge_factors_auto(
    method_name: str, factors: Sequence[Factors | None], shape: tuple[int, int], resolved: dict,
    max_error: float, *, generators, workers, block_rows, exact_below, refactor_generator, info,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``merge_factors`` with ``--rank auto``: the smallest rank with error ≤ ``max_error``."""
    from .lowrank import AUTO_SPAN, auto_rank, out_of_span, refactor_auto

    m, n = shape
    present = [f for f in factors if f is not None]
    dtype = present[0][0].dtype if present else torch.float32
    if not present:
        _note(info, "svd", 0, 0.0)
        return torch.zeros(m, 1, dtype=dtype), torch.zeros(1, n, dtype=dtype), 0.0
    dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                        workers=workers, block_rows=block_rows, exact_below=exact_below)
    if sum(f[0].shape[1] for f in present) < min(m, n) // 2:
        q = _joint_basis(present, dtype)
        proj = (q.T @ dense).double()  # [q, in]
        norm2 = float(torch.linalg.vector_norm(dense, dtype=torch.float64)) ** 2
        if norm2 == 0.0:
            _note(info, "projection", q.shape[1], 0.0)
            return torch.zeros(m, 1, dtype=dtype), torch.zeros(1, n, dtype=dtype), 0.0
        s2, u = _core(proj)
        rho = out_of_span(s2, norm2)
        k = auto_rank(s2, norm2, max_error) if rho <= AUTO_SPAN * max_error else None
        if k is not None:
            _note(info, "projection", q.shape[1], rho)
            return _projected_factors(q, proj, s2, u, norm2, k, dtype)
    return refactor_auto(dense, max_error, generator=refactor_generator, info=info)
