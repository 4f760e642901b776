"""The streamed merge of one module: all adapters at once, row block by row block.

Equal to ``engine.apply_method(method, tv.stacked(path), params)`` — identical trimming and
random masks, mixing equal to float rounding — without ever holding a dense ΔW per adapter:
each τ_i = L_i R_i is recomputed a row block at a time (``selection.row_blocks``).

Plain top-k trimming with sign consensus (no rescale, tensors above ``exact_below``) runs in
**one** pass: each block is tallied and mixed with a provisional threshold by one fused kernel,
the positions inside some threshold's bracket are recorded with their raw values, and once the
exact thresholds are selected among them only those whose keep decision changes are re-mixed
(``_Stream._single_pass_brackets``, ``resolve``). The element-wise work is done by the numba
kernels of ``kernels.py``. Every other streamed method (and a missed bracket) takes at most two
passes over the row blocks:

1. **stats** (only when a sparsifier needs a global quantity), one task per adapter: the exact
   top-k thresholds or the random keep masks (``selection``, turned into ``plans.Plan``).
2. **mix**, row blocks split over worker threads: trim, weight, then either sign election and
   the masked mean (``kernels.consensus``) or ``methods.mix`` itself, and send the block either
   into the dense output or into the projection ``Qᵀ D`` for adapter output (``projection``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..methods import MergeMethod, Sparsifier, mix
from . import selection
from .plans import (
    TOP_K,
    Factors,
    Plan,
    adapter_spec,
    by_sign,
    magnitude_plan,
    random_plan,
    streamed_method,
)
from .selection import (
    _EMPTY,
    _EXACT_BELOW,
    _SAMPLE,
    _Z,
    TopK,
    _grow,
    _np_dtype,
    _select_candidates,
    row_blocks,
)
from .threads import default_workers, map_tasks, single_threaded_ops

_BLOCK_BYTES = 1 << 20  # one adapter's row block: ~1 MB keeps n blocks + buffers near L2
_NO_MASK = np.zeros((1, 1), dtype=bool)


class _Stream:
    """One module's streamed merge: the plans (single pass or stats pass) and the mix of row
    blocks, for a method the streamed path ``supports``."""

    def __init__(
        self,
        method: MergeMethod | str,
        factors: Sequence[Factors | None],
        shape: tuple[int, int],
        resolved: dict,
        generators: Sequence[torch.Generator] | None,
        *,
        workers: int,
        block_rows: int | None,
        exact_below: int,
    ):
        self.method = streamed_method(method, resolved)
        self.factors, self.shape, self.resolved = list(factors), tuple(shape), resolved
        self.n = len(self.factors)
        self.dtype = next((f[0].dtype for f in self.factors if f is not None), torch.float32)
        self.workers = workers
        m, n = self.shape
        rows = block_rows or max(2, _BLOCK_BYTES // (n * torch.finfo(self.dtype).bits // 8))
        self.blocks = row_blocks(m, rows)
        self.weights = [float(w) for w in resolved["weight"]]
        self.w = torch.tensor(self.weights, dtype=self.dtype)  # as apply_method builds it
        self.w_stacked = self.w.view(-1, 1, 1)  # as methods.mix sees it
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
        if numel <= self.exact_below or not by_sign(self.method):
            return None
        kinds = [
            adapter_spec(self.method, self.resolved, i, numel) if f is not None else (None, {})
            for i, f in enumerate(self.factors)
        ]
        if any(
            kind not in (None, Sparsifier.NONE)
            and not (kind is Sparsifier.MAGNITUDE and len(spec["ks"]) == 1 and not spec["rescale"])
            for kind, spec in kinds
        ):
            return None
        if all(kind is not Sparsifier.MAGNITUDE for kind, _ in kinds):
            return None

        def bracket(i):
            kind, spec = kinds[i]
            if kind is not Sparsifier.MAGNITUDE or spec["ks"][0] >= numel:
                return None
            L, R = self.factors[i]
            sample = selection._sample_abs(L, R, min(max(_SAMPLE[0], numel >> 8), _SAMPLE[1]))
            lo, hi = selection._bracket(sample, numel, spec["ks"][0])
            mid = float(np.dtype(_np_dtype(self.dtype)).type(lo + (hi - lo) / 2))
            return lo, hi, spec["ks"][0], sample.size, mid

        found = map_tasks([lambda i=i: bracket(i) for i in range(self.n)], self.workers)
        self.plans = [
            Plan("zero")
            if kind is None
            else Plan("none")
            if b is None
            else Plan("topk", keep=TopK(b[4], _EMPTY))
            for (kind, _), b in zip(kinds, found)
        ]
        return found

    def _tally_state(self, n_rows: int) -> dict:
        numel = self.shape[0] * self.shape[1]
        npd = _np_dtype(self.dtype)
        as_s = np.dtype(npd).type
        frac = max(
            (4 * _Z[0] * math.sqrt(0.25 / b[3]) for b in self.single if b is not None), default=0.0
        )
        rows_here = n_rows / self.shape[0]
        cap = int(numel * rows_here * min(1.0, frac)) + 4096
        ucap = min(int(cap * sum(b is not None for b in self.single)), int(numel * rows_here) + 1)
        n = self.shape[1]
        lam = self.resolved.get("lambda", 1.0)
        return {
            "lo": np.array([b[0] if b else math.inf for b in self.single], npd),
            "hi": np.array([b[1] if b else math.inf for b in self.single], npd),
            "active": np.array([b is not None for b in self.single]),
            # provisional plans: keep |τ| > t̂ (kept whole: > −1; absent: zeros anyway)
            "keep_t": np.array([b[4] if b else -1.0 for b in self.single], npd),
            "c2": self.w.numpy(),
            "use_c2": np.array([w != 1.0 for w in self.weights]),
            "above": np.zeros(self.n, np.int64),
            "uidx": np.empty(ucap, np.int64),
            "uraw": np.empty((self.n, ucap), npd),
            "upos": np.zeros(1, np.int64),
            "union": np.empty((n + 31) // 32, np.uint32),
            "flags": np.zeros((n + 7) // 8 * 8, np.uint8),
            "mix": (
                self.w.numpy(),
                bool(self.resolved.get("normalize", False)),  # no such parameter: no division
                min(self.weights) > 0,
                as_s(lam),
                lam != 1,
                np.empty(n, npd),
                np.empty(n, npd),
                np.empty(n, npd),
            ),
        }

    def _tally_mix(self, st: dict, ys: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> None:
        """``kernels.tally_mix`` of one block; if a buffer was short, grow it and redo the block
        (from the products: the kernel overwrote them)."""
        from .. import kernels

        b = r1 - r0
        while True:
            saved = st["above"].copy(), st["upos"].copy()
            kernels.tally_mix(
                ys.numpy(),
                b,
                r0 * self.shape[1],
                st["lo"],
                st["hi"],
                st["active"],
                st["keep_t"],
                st["c2"],
                st["use_c2"],
                st["above"],
                st["uidx"],
                st["uraw"],
                st["upos"],
                st["union"],
                st["flags"],
                out.numpy(),
                *st["mix"],
            )
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
        from .. import kernels

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
            got = kernels.bracket_candidates(
                uraw[i], count, uraw.dtype.type(b[0]), uraw.dtype.type(b[1]), uidx, values, index
            )  # this adapter's candidates
            values, index = values[:got], index[:got]
            need = b[2] - above
            if need < 0 or need > values.size:
                return None
            if need == 0:
                exact.append(Plan("topk", keep=TopK(b[1], _EMPTY)))
            else:
                t, ties, _ = _select_candidates(values, index, need, False)
                exact.append(Plan("topk", keep=TopK(t, ties)))
        npd = _np_dtype(self.dtype)
        active = np.array([b is not None for b in self.single])
        provisional_t = np.array([p.keep.t if a else 0.0 for p, a in zip(self.plans, active)], npd)
        exact_t = np.array([p.keep.t if a else 0.0 for p, a in zip(exact, active)], npd)
        raw_out, index_out = np.empty((self.n, count), uraw.dtype), np.empty(count, np.int64)
        got = kernels.decisions_differ(
            uraw, uidx, count, provisional_t, exact_t, active, raw_out, index_out
        )
        uidx, uraw = index_out[:got], raw_out[:, :got]  # _mix_points mixes copies in place
        provisional = self._mix_points(uraw.copy(), uidx, self.plans)
        self.plans = exact
        self._args = [self._kernel_args(i) for i in range(self.n)]
        final = self._mix_points(uraw, uidx, exact)
        changed = final != provisional  # entries between t̂ and the exact threshold, and ties
        return torch.from_numpy(uidx)[changed], final[changed], provisional[changed]

    def _mix_points(self, raw: np.ndarray, index: np.ndarray, plans: list[Plan]) -> torch.Tensor:
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

    def _stats(self, generators, exact_below) -> list[Plan]:
        """The stats pass: each adapter's exact plan (``plans.magnitude_plan`` /
        ``plans.random_plan``), one task per adapter."""
        numel = self.shape[0] * self.shape[1]
        tasks = []
        for i, f in enumerate(self.factors):
            kind, spec = adapter_spec(self.method, self.resolved, i, numel)
            if f is None:
                tasks.append(lambda: Plan("zero"))
            elif kind is Sparsifier.NONE:
                tasks.append(lambda: Plan("none"))
            elif kind in TOP_K:
                tasks.append(
                    lambda f=f, spec=spec: magnitude_plan(
                        f, spec, self.blocks, exact_below, self.dtype
                    )
                )
            else:
                spec = {**spec, "kind": kind}
                tasks.append(
                    lambda f=f, spec=spec, g=generators[i]: random_plan(
                        f, spec, g, self.shape, self.blocks, self.dtype
                    )
                )
        return map_tasks(tasks, self.workers)

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

    def _sparsify(
        self,
        i: int,
        y: torch.Tensor,
        ties: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> None:
        """τ_i (a block of ``y``) → sparsified and weighted, in place (``kernels.select``);
        ``ties``: local flat positions of the kept and dropped threshold ties."""
        from .. import kernels

        plan = self.plans[i]
        if plan.kind == "zero":
            return
        args = self._args[i]
        if args is not None:
            mode, keep_t, drop_t, c1, use_c1, c2, use_c2 = args
            kernels.select(
                y.numpy(),
                y.shape[0],
                mode,
                keep_t,
                drop_t,
                ties[0].numpy(),
                ties[1].numpy(),
                mask.numpy() if mode == 3 else _NO_MASK,
                c1,
                use_c1,
                c2,
                use_c2,
            )
        if plan.divide is not None:  # DARE's 1/p: eager, then the multiplications in order
            y.div_(plan.divide)
            if plan.scale is not None:
                y.mul_(plan.scale)
            if self.weights[i] != 1.0:
                y.mul_(self.w[i])

    def _block_ties(self, i: int, r0: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan, base = self.plans[i], r0 * self.shape[1]
        keep = _local(plan.keep.ties, base, size) if plan.keep is not None else _EMPTY
        drop = (
            _local(plan.drop.ties, base, size)
            if plan.drop is not None and not plan.drop.nothing
            else _EMPTY
        )
        return keep, drop

    def _combine(self, ys: torch.Tensor, b: int, out: torch.Tensor, ties, masks=None) -> None:
        """Sparsify each ``ys[i, :b]`` (raw τ) and mix them into ``out[:b]``."""
        from .. import kernels

        for i in range(self.n):
            self._sparsify(i, ys[i, :b], ties(i), masks(i) if masks else None)
        yb, ob = ys[:, :b], out[:b]
        if not by_sign(self.method):  # the dense path's own finish: Σ, ÷ Σw (guarded), × λ
            mix(
                yb,
                self.w_stacked,
                None,
                normalize=bool(self.resolved.get("normalize")),
                lambda_=self.resolved.get("lambda", 1.0),
                out=ob,
            )
        else:  # sign election and the masked mean, fused (kernels.consensus)
            npd = _np_dtype(self.dtype)
            lam = self.resolved.get("lambda", 1.0)
            rowbufs = [np.empty(ys.shape[2], npd) for _ in range(3)]
            kernels.consensus(
                ys.numpy(),
                b,
                out.numpy(),
                self.w.numpy(),
                bool(self.resolved.get("normalize", False)),  # no such parameter: no division
                min(self.weights) > 0,
                np.dtype(npd).type(lam),
                lam != 1,
                *rowbufs,
            )

    def mix_rows(
        self,
        blocks,
        sink: Callable[[int, int, torch.Tensor], None],
        target: Callable[[int, int], torch.Tensor] | None = None,
    ) -> dict | None:
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
                self._combine(
                    ys,
                    b,
                    out,
                    lambda i, r0=r0, b=b: self._block_ties(i, r0, b * cols),
                    lambda i, r0=r0, r1=r1: (
                        None if self.plans[i].mask is None else self.plans[i].mask[r0:r1]
                    ),
                )
            sink(r0, r1, out)
        return tally

    def split(self) -> list[list[tuple[int, int]]]:
        """The row blocks as contiguous runs, one per worker."""
        w = max(1, min(self.workers, len(self.blocks)))
        per = math.ceil(len(self.blocks) / w)
        return [self.blocks[s : s + per] for s in range(0, len(self.blocks), per)]


def _positions(plan: Plan, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
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
    method: MergeMethod | str,
    factors: Sequence[Factors | None],
    shape: tuple[int, int],
    resolved: dict,
    *,
    generators: Sequence[torch.Generator] | None = None,
    workers: int | None = None,
    block_rows: int | None = None,
    exact_below: int = _EXACT_BELOW,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged update of one module, dense ``[out, in]``, from each adapter's factors.

    ``method``: a streamable ``MergeMethod`` (or its registered name). ``factors[i]``:
    ``(L_i, R_i)`` with L_i R_i = τ_i, or None (τ_i = 0). ``resolved``: the
    method's resolved parameters (``engine.resolve_params``). ``generators``: one per adapter,
    seeded as ``engine.apply_method`` seeds them (random methods only).
    """
    workers = workers or default_workers()
    with single_threaded_ops():
        st = _Stream(
            method,
            factors,
            shape,
            resolved,
            generators,
            workers=workers,
            block_rows=block_rows,
            exact_below=exact_below,
        )
        result = out if out is not None else torch.empty(shape, dtype=st.dtype)

        def sink(r0, r1, block):  # the blocks are written in place
            pass

        def target(r0, r1):
            return result[r0:r1]

        tallies = map_tasks(
            [lambda run=run: st.mix_rows(run, sink, target) for run in st.split()], workers
        )
        if st.single is not None:
            fixed = st.resolve(tallies)
            if fixed is None:  # a bracket missed: the two passes
                st.two_pass()
                map_tasks(
                    [lambda run=run: st.mix_rows(run, sink, target) for run in st.split()], workers
                )
            else:
                index, exact, _ = fixed
                result.view(-1)[index] = exact
    return result
