"""Adapter output of a streamed merge: the merged update D re-factorised to low rank.

``merge_factors`` re-factorises D without forming it: Q is an orthonormal basis of the adapters'
joint column space (the stacked L factors), ``Qᵀ D`` is accumulated block by block in the mix
pass (``single_pass``), and its SVD gives L' = Q U_k S_k, R' = V_kᵀ. L'R' = P D for the orthogonal
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
from the projection's left singular directions): the one closer to D is kept (``_best_of``;
DESIGN.md, Merging).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..methods import MergeMethod
from .plans import Factors
from .selection import _EXACT_BELOW
from .single_pass import _Stream, merge_dense
from .threads import default_workers, map_tasks, single_threaded_ops

_STAGE_BYTES = 4 << 20  # merged rows gathered before each projection update (adapter output)


def merge_factors(
    method: MergeMethod | str,
    factors: Sequence[Factors | None],
    shape: tuple[int, int],
    resolved: dict,
    rank: int | None,
    *,
    generators: Sequence[torch.Generator] | None = None,
    workers: int | None = None,
    block_rows: int | None = None,
    exact_below: int = _EXACT_BELOW,
    oversample: int = 8,
    refactor_generator: torch.Generator | None = None,
    max_error: float | None = None,
    info: dict | None = None,
    refactor: str = "projection",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors ``(L', R')`` of the merged update and the exact relative error
    ‖D − L'R'‖_F / ‖D‖_F, without forming D (see the module docstring). ``method`` and the
    other arguments as ``merge_dense``.

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
    from .. import kernels
    from ..lowrank import REFACTORS
    from ..lowrank import refactor as refactor_dense

    m, n = shape
    if refactor not in REFACTORS:
        raise ValueError(f"refactor must be one of {REFACTORS}, got {refactor!r}")
    if max_error is not None:
        return _merge_factors_auto(
            method,
            factors,
            shape,
            resolved,
            max_error,
            generators=generators,
            workers=workers,
            block_rows=block_rows,
            exact_below=exact_below,
            refactor_generator=refactor_generator,
            info=info,
        )
    k = min(rank, m, n)
    present = [f for f in factors if f is not None]
    basis_cols = sum(f[0].shape[1] for f in present)
    dtype = present[0][0].dtype if present else torch.float32
    if not present:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0

    def merged() -> torch.Tensor:  # the dense merged update, where D is formed after all
        return merge_dense(
            method,
            factors,
            shape,
            resolved,
            generators=generators,
            workers=workers,
            block_rows=block_rows,
            exact_below=exact_below,
        )

    if refactor == "best":
        dense = merged()
        return _best_of(
            dense, _joint_basis(present, dtype), k, generator=refactor_generator, info=info
        )
    if basis_cols < k + oversample or basis_cols >= min(m, n) // 2:
        dense = merged()
        return refactor_dense(dense, rank, generator=refactor_generator, info=info)
    workers = workers or default_workers()
    q = _joint_basis(present, dtype)
    if q.shape[1] < k + oversample:
        dense = merged()
        return refactor_dense(dense, rank, generator=refactor_generator, info=info)
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
                    proj.addmm_(q64[held[0] : held[0] + held[1]].T, stage[: held[1]].double())
                held[0], held[1] = held[0] + held[1], 0

            def target(r0, r1):  # blocks are mixed straight into the stage
                return stage[held[1] : held[1] + r1 - r0]

            def sink(r0, r1, block):
                held[1] += r1 - r0
                norm2[0] += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
                if held[1] >= stage_rows:
                    flush()

            tally = st.mix_rows(run, sink, target)
            flush()
            return proj, norm2[0], tally

        parts = map_tasks([lambda run=run: run_rows(run) for run in st.split()], workers)
        fixed = st.resolve([t for _, _, t in parts]) if st.single is not None else None
        if st.single is not None and fixed is None:  # a bracket missed: the two passes
            st.two_pass()
            parts = map_tasks([lambda run=run: run_rows(run) for run in st.split()], workers)
    proj = sum(p for p, _, _ in parts)  # [q, in], float64
    norm2 = sum(s for _, s, _ in parts)
    if fixed is not None:  # the uncertain positions: exact value − provisional value
        index, exact, provisional = fixed
        delta = exact.double() - provisional.double()
        correction = np.zeros((n, q.shape[1]))
        kernels.scatter_project(
            correction, q.numpy(), (index // n).numpy(), (index % n).numpy(), delta.numpy()
        )
        proj += torch.from_numpy(correction).T
        norm2 += float((exact.double() ** 2).sum() - (provisional.double() ** 2).sum())
    if norm2 == 0.0:
        return torch.zeros(m, k, dtype=dtype), torch.zeros(k, n, dtype=dtype), 0.0
    # top-k of the small core from its Gram matrix: proj projᵀ = U S² Uᵀ
    s2, u = _core(proj)
    from ..lowrank import out_of_span

    _note(info, "projection", q.shape[1], out_of_span(s2, norm2))
    return _projected_factors(q, proj, s2, u, norm2, k, dtype)


def _best_of(
    dense: torch.Tensor,
    q: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator | None,
    info: dict | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
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
    from ..lowrank import out_of_span, refactor, relative_error

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
        block = dense[r0 : r0 + rows].double()
        proj.addmm_(q64[r0 : r0 + rows].T, block)
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


def _projected_factors(
    q, proj, s2, u, norm2: float, k: int, dtype
) -> tuple[torch.Tensor, torch.Tensor, float]:
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
    method: MergeMethod | str,
    factors: Sequence[Factors | None],
    shape: tuple[int, int],
    resolved: dict,
    max_error: float,
    *,
    generators,
    workers,
    block_rows,
    exact_below,
    refactor_generator,
    info,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``merge_factors`` with ``--rank auto``: the smallest rank with error ≤ ``max_error``."""
    from ..lowrank import AUTO_SPAN, auto_rank, out_of_span, refactor_auto

    m, n = shape
    present = [f for f in factors if f is not None]
    dtype = present[0][0].dtype if present else torch.float32
    if not present:
        _note(info, "svd", 0, 0.0)
        return torch.zeros(m, 1, dtype=dtype), torch.zeros(1, n, dtype=dtype), 0.0
    dense = merge_dense(
        method,
        factors,
        shape,
        resolved,
        generators=generators,
        workers=workers,
        block_rows=block_rows,
        exact_below=exact_below,
    )
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
