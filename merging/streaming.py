"""The streamed merge of one module: all adapters at once, row block by row block.

Equal to ``engine.apply_method(method, tv.stacked(path), params)`` — identical trimming and
random masks, mixing equal to float rounding — without ever holding a dense ΔW per adapter:
each τ_i = L_i R_i is recomputed a row block at a time (``L_i[rows] @ R_i``, bit-identical to the
full product's rows; MKL's 1-row product is a gemv that rounds differently, so no block is 1 row).

Per module, at most two passes over the row blocks:

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

Worker threads run single-threaded torch ops on cache-sized blocks (a 2-core machine shared with
other jobs loses more to OpenMP barriers on small ops than it gains).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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
_SAMPLE = (1 << 14, 1 << 17)  # entries sampled per adapter to bracket the threshold (min, max)
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


@contextlib.contextmanager
def _single_threaded_ops():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _sample_abs(L: torch.Tensor, R: torch.Tensor, count: int) -> torch.Tensor:
    """|τ| at ``count`` uniformly random positions, from the factors (approximate rounding)."""
    g = torch.Generator().manual_seed(0x5EED)  # only the speed, never the result, depends on it
    m, n = L.shape[0], R.shape[1]
    rows = torch.randint(m, (count,), generator=g)
    cols = torch.randint(n, (count,), generator=g)
    out = torch.empty(count, dtype=L.dtype)
    step = max(1, (1 << 22) // max(1, L.shape[1]))
    for s in range(0, count, step):
        e = min(count, s + step)
        out[s:e] = (L[rows[s:e]] * R[:, cols[s:e]].T).sum(1)
    return out.abs_()


def _bracket(sample_sorted: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    """[lo, hi] around the k-th largest |τ| of n entries, from a sorted sample; 6σ wide."""
    s = sample_sorted.numel()
    q = 1.0 - k / n  # fraction strictly below the threshold
    delta = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / s) / s) + 4.0 / s
    lo_i, hi_i = math.floor((q - delta) * s), math.ceil((q + delta) * s)
    lo = float(sample_sorted[lo_i]) if lo_i >= 0 else 0.0
    hi = float(sample_sorted[hi_i]) if hi_i < s else math.inf
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


def _stats_magnitude(L, R, ks: list[int], rescale: bool, blocks, exact_below: int) -> list[TopK]:
    """Exact top-k descriptors of |L R| for each k (one pass over the row blocks)."""
    m, n = L.shape[0], R.shape[1]
    numel = m * n
    if numel <= exact_below:
        a = (L @ R).abs_()
        return [_descriptor_dense(a, k, sums=rescale) for k in ks]
    count = min(max(_SAMPLE[0], numel >> 8), _SAMPLE[1])
    sample = torch.sort(_sample_abs(L, R, count)).values
    brackets = [(-math.inf, math.inf) if (k <= 0 or k >= numel) else _bracket(sample, numel, k) for k in ks]
    tau = torch.empty(max(r1 - r0 for r0, r1 in blocks), n, dtype=L.dtype)
    a = torch.empty_like(tau)
    gt = torch.empty(tau.shape, dtype=torch.bool)
    inb = torch.empty(tau.shape, dtype=torch.bool)
    above = [0] * len(ks)
    above_sum = [0.0] * len(ks)
    cand_v: list[list[torch.Tensor]] = [[] for _ in ks]
    cand_i: list[list[torch.Tensor]] = [[] for _ in ks]
    total = 0.0
    for r0, r1 in blocks:
        b = r1 - r0
        tb, ab, gtb, ib = tau[:b], a[:b], gt[:b], inb[:b]
        torch.matmul(L[r0:r1], R, out=tb)
        torch.abs(tb, out=ab)
        if rescale:
            total += float(ab.sum(dtype=torch.float64))
        for j, (lo, hi) in enumerate(brackets):
            if math.isinf(lo) and math.isinf(hi):
                continue
            torch.gt(ab, hi, out=gtb)
            above[j] += int(torch.count_nonzero(gtb))
            if rescale:
                above_sum[j] += float((ab * gtb).sum(dtype=torch.float64))
            torch.ge(ab, lo, out=ib)
            ib.logical_xor_(gtb)  # lo ≤ |τ| ≤ hi (gt ⊂ ge)
            idx = ib.view(-1).nonzero().squeeze(1)
            cand_v[j].append(ab.view(-1)[idx])
            cand_i[j].append(idx + r0 * n)
    out = []
    dense_a = None
    for j, k in enumerate(ks):
        if k <= 0:
            out.append(TopK(0.0, _EMPTY, nothing=True))
            continue
        if k >= numel:
            out.append(TopK(0.0, _EMPTY, everything=True, kept_abs_sum=total))
            continue
        values = torch.cat(cand_v[j]) if cand_v[j] else torch.zeros(0, dtype=L.dtype)
        index = torch.cat(cand_i[j]) if cand_i[j] else _EMPTY
        need = k - above[j]
        if need < 0 or need > values.numel():  # the sample's bracket missed: select exactly
            if dense_a is None:
                dense_a = (L @ R).abs_()
            out.append(_descriptor_dense(dense_a, k, sums=rescale))
            continue
        if need == 0:
            out.append(TopK(brackets[j][1], _EMPTY, kept_abs_sum=above_sum[j]))
            continue
        t, ties, kept = _topk_from_values(values, index, need)
        kept_sum = above_sum[j] + (float(values[kept].sum(dtype=torch.float64)) if rescale else 0.0)
        out.append(TopK(t, ties, kept_abs_sum=kept_sum))
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
        self.plans = self._stats(generators, exact_below)

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
    def _sparsify(self, i: int, r0: int, r1: int, y: torch.Tensor) -> None:
        """τ_i rows [r0, r1) → sparsified and weighted, in place in ``y``."""
        plan, f = self.plans[i], self.factors[i]
        if plan.kind == "zero":
            y.zero_()
            return
        torch.matmul(f[0][r0:r1], f[1], out=y)
        flat = y.view(-1)
        base = r0 * self.shape[1]
        if plan.kind in ("topk", "band"):
            ties = _local(plan.keep.ties, base, y.numel())
            kept_ties = flat[ties].clone() if ties.numel() else None
            if plan.kind == "band" and not plan.drop.nothing:
                # entries of the dropped top-k become exact zeros: x − x = 0, y − 0 = y
                top = torch.ops.aten.hardshrink(y, plan.drop.t)
                if not plan.keep.everything:
                    torch.ops.aten.hardshrink.out(y, plan.keep.t, out=y)
                y.sub_(top)
                drop_ties = _local(plan.drop.ties, base, y.numel())
            else:
                torch.ops.aten.hardshrink.out(y, plan.keep.t, out=y)
                drop_ties = _EMPTY
            if kept_ties is not None:
                flat[ties] = kept_ties
            if drop_ties.numel():
                flat[drop_ties] = 0
        elif plan.kind == "mask":
            y.mul_(plan.mask[r0:r1])
        if plan.divide is not None:
            y.div_(plan.divide)
        if plan.scale is not None:
            y.mul_(plan.scale)
        if self.weights[i] != 1.0:
            y.mul_(self.w[i])

    def mix_rows(self, blocks, sink: Callable[[int, int, torch.Tensor], None]) -> None:
        """Mix the row blocks ``blocks`` and hand each merged block to ``sink(r0, r1, block)``."""
        n_rows = max(r1 - r0 for r0, r1 in blocks)
        cols = self.shape[1]
        ys = torch.empty(self.n, n_rows, cols, dtype=self.dtype)  # [n_adapters, rows, in]
        out = torch.empty(n_rows, cols, dtype=self.dtype)
        tmp = torch.empty(n_rows, cols, dtype=self.dtype)
        z = torch.empty_like(ys)
        consensus = self.name in _CONSENSUS
        for r0, r1 in blocks:
            b = r1 - r0
            yb, ob = ys[:, :b], out[:b]
            for i in range(self.n):
                self._sparsify(i, r0, r1, yb[i])
            if self.name == "linear":
                torch.sum(yb, 0, out=ob)
                if self.resolved["normalize"]:
                    ob.div_(self.w.sum())
            elif not consensus:
                torch.sum(yb, 0, out=ob)
                self._finish(ob, None)
            else:
                self._elect_and_mix(yb, z[:, :b], ob, tmp[:b])
            sink(r0, r1, ob)

    def _elect_and_mix(self, yb, zb, ob, sign) -> None:
        # majority = sign of Σ_i y_i (≥ 0 → +); entry i agrees when y_i · majority > 0.
        torch.sum(yb, 0, out=sign)
        _majority(sign)
        torch.mul(yb, sign, out=zb)  # [n, rows, in]: |y_i| where agreeing, ≤ 0 otherwise
        zb.clamp_min_(0)
        torch.sum(zb, 0, out=ob)  # Σ over agreeing |y_i| (same order as the dense sum)
        ob.mul_(sign)
        if self.resolved["normalize"]:
            torch.sign(zb, out=zb)  # 1 where agreeing, 0 elsewhere
            divisor = sign.zero_()  # Σ_i w_i [agrees], summed in adapter order like mix()
            for i in range(self.n):
                divisor.add_(zb[i], alpha=self.weights[i])
            if min(self.weights) > 0:  # divisor is 0 only where nothing agrees (mixed = 0 there)
                divisor.clamp_min_(torch.finfo(divisor.dtype).tiny)
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
            ob.div_(divisor)
        if self.resolved["lambda"] != 1:
            ob.mul_(self.resolved["lambda"])

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


def _majority(s: torch.Tensor) -> None:
    """In place: +1 where s ≥ 0, −1 elsewhere (``methods.sign_consensus``'s election)."""
    neg = s < 0
    s.fill_(1.0).masked_fill_(neg, -1.0)


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

        def sink(r0, r1, block):
            result[r0:r1].copy_(block)

        _map([lambda run=run: st.mix_rows(run, sink) for run in st.split()], workers)
    return result


def merge_factors(
    method_name: str, factors: Sequence[Factors | None], shape: tuple[int, int], resolved: dict,
    rank: int, *, generators: Sequence[torch.Generator] | None = None, workers: int | None = None,
    block_rows: int | None = None, exact_below: int = _EXACT_BELOW, oversample: int = 8,
    refactor_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors ``(L', R')`` of the merged update and the exact relative error
    ‖D − L'R'‖_F / ‖D‖_F, without forming D (see the module docstring).

    Falls back to ``lowrank.refactor`` on the streamed dense D when the adapters' joint basis is
    too small to hold rank + ``oversample`` directions or D is small.
    """
    from .lowrank import refactor

    m, n = shape
    k = min(rank, m, n)
    present = [f for f in factors if f is not None]
    basis_cols = sum(f[0].shape[1] for f in present)
    dtype = present[0][0].dtype if present else torch.float32
    if not present:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0
    if basis_cols < k + oversample or basis_cols >= min(m, n) // 2:
        dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                            workers=workers, block_rows=block_rows, exact_below=exact_below)
        return refactor(dense, rank, generator=refactor_generator)
    workers = workers or default_workers()
    # Orthonormal basis Q = L_all W of the joint column space, W from the Gram matrix (float64;
    # dependent columns — shared lineage factors — are dropped): Qᵀ D = Wᵀ (L_allᵀ D).
    l_all = torch.cat([f[0] for f in present], dim=1)  # [out, Σr]
    lam, vec = torch.linalg.eigh(l_all.T.double() @ l_all.double())
    keep = lam > lam.max() * 1e-10
    w = vec[:, keep] / lam[keep].sqrt()  # [Σr, q]
    if int(keep.sum()) < k + oversample:
        dense = merge_dense(method_name, factors, shape, resolved, generators=generators,
                            workers=workers, block_rows=block_rows, exact_below=exact_below)
        return refactor(dense, rank, generator=refactor_generator)
    q = (l_all.double() @ w).to(dtype)  # [out, q]
    with _single_threaded_ops():
        st = _Stream(method_name, factors, shape, resolved, generators, workers=workers,
                     block_rows=block_rows, exact_below=exact_below)

        def run_rows(run):
            proj = torch.zeros(q.shape[1], n, dtype=dtype)  # Qᵀ D of these rows
            norm2 = [0.0]

            def sink(r0, r1, block):
                proj.addmm_(q[r0:r1].T, block)
                flat = block.reshape(-1)
                norm2[0] += float(torch.dot(flat, flat))

            st.mix_rows(run, sink)
            return proj, norm2[0]

        parts = _map([lambda run=run: run_rows(run) for run in st.split()], workers)
    proj = sum(p.double() for p, _ in parts)  # [q, in]
    norm2 = sum(s for _, s in parts)
    if norm2 == 0.0:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0
    # top-k of the small core from its Gram matrix: proj projᵀ = U S² Uᵀ
    s2, u = torch.linalg.eigh(proj @ proj.T)
    s2, u = s2.flip(0)[:k].clamp_min(0), u.flip(1)[:, :k]
    sv = s2.sqrt()
    nz = sv > 0
    right = torch.zeros(k, n, dtype=torch.float64)
    right[nz] = (u[:, nz].T @ proj) / sv[nz, None]  # V_kᵀ = S_k⁻¹ U_kᵀ (Qᵀ D)
    left = (q.double() @ (u * sv)).to(dtype)
    right = right.to(dtype)
    err2 = max(0.0, norm2 - float(s2.sum()))
    return left, right, math.sqrt(err2 / norm2)
