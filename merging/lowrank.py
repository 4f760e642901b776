"""Low-rank algebra for adapter outputs: exact concatenation, core compression, refactorisation.

All updates are weight-shaped products ``L @ R`` (``L: [out, r]``, ``R: [r, in]``).

Rank chosen by error (``refactor_auto``, ``auto_rank``): for an orthonormal basis Q of
``[out, q]`` columns and D = P D + P⊥D (P = QQᵀ), truncating P D to its top k singular directions
leaves the exact error ‖D − L'R'‖² = ‖P⊥D‖² + Σ_{j>k} s_j(P D)² (the out-of-span residual plus
the in-basis tail). The smallest k with that ≤ E²‖D‖² is minimal within the basis, and by Ky
Fan's inequality (DᵀD = (PD)ᵀPD + (P⊥D)ᵀP⊥D) no rank-(k−1) matrix at all gets closer to D than
√(E² − ρ²)·‖D‖, ρ = ‖P⊥D‖/‖D‖. A basis is accepted only when ρ ≤ E·``AUTO_SPAN`` (½), so
rank − 1 is provably above √¾·E ≈ 0.87·E whatever the factorisation; with the exact SVD (ρ = 0)
the rank is the Eckart–Young minimum.
"""

from __future__ import annotations

import math

import torch

#: a basis is used for ``--rank auto`` only when its out-of-span residual is ≤ this × max_error
AUTO_SPAN = 0.5
#: fixed-rank re-factorisations of a sparse merge (``--refactor``): the projection onto the
#: adapters' joint basis, or the better of it and a truncated SVD of the dense merged block
REFACTORS = ("projection", "best")


def concat(
    terms: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ c_k L_k R_k as one product: ``[c_1 L_1 | c_2 L_2 | …] @ [R_1; R_2; …]`` (exact)."""
    left = torch.cat([c * L for L, _, c in terms], dim=1)
    right = torch.cat([R for _, R, _ in terms], dim=0)
    return left, right


def compress(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``left @ right`` without forming it.

    QR of both factors, SVD of the small ``R×R`` core: O((m+n)·R²), never an m×n SVD.
    Returns the new factors and the relative Frobenius error ‖LR − L'R'‖ / ‖LR‖ (computed from
    the core's singular values, which are those of LR).
    """
    q_l, r_l = torch.linalg.qr(left)  # [m, R], [R, R]
    q_r, r_r = torch.linalg.qr(right.T)  # [n, R], [R, R]
    u, s, vh = torch.linalg.svd(r_l @ r_r.T)
    k = min(rank, s.numel())
    new_left = q_l @ (u[:, :k] * s[:k])
    new_right = vh[:k] @ q_r.T
    return new_left, new_right, _tail_error(s, k)


def _tail_error(s: torch.Tensor, k: int) -> float:
    s = s.double()
    total = float(s.square().sum())
    return (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0


def refactor(
    dense: torch.Tensor,
    rank: int,
    *,
    generator: torch.Generator | None = None,
    oversample: int = 10,
    n_iter: int = 4,
    info: dict | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors of a dense update by randomized truncated SVD, and the relative error.

    Halko et al.'s range finder with ``oversample`` extra columns and ``n_iter`` power iterations
    (QR-stabilised), seeded so the result is reproducible. Small matrices take an exact SVD.
    ``start`` (``[out, j]``, optional): columns the range finder starts from, besides
    ``oversample`` random ones — subspace iteration from a known approximation of D's leading
    column space (``--refactor best`` starts from the projection's). The error is measured on the
    actual product: ‖D − L'R'‖_F / ‖D‖_F. ``info`` (if given) receives ``refactor`` (``svd`` |
    ``randomized svd``).
    """
    m, n = dense.shape
    k = min(rank, m, n)
    q = min(k + oversample, m, n)
    exact = q >= min(m, n) // 2
    if info is not None:
        info["refactor"] = "svd" if exact else "randomized svd"
    norm = torch.linalg.matrix_norm(dense)
    if float(norm) == 0.0:
        return dense.new_zeros(m, k), dense.new_zeros(k, n), 0.0
    if exact:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        left, right = u[:, :k] * s[:k], vh[:k]
    else:
        if start is not None:
            start = start[:, : q - min(oversample, q)]  # room for the random columns
        basis = _range_basis(dense, q, generator, n_iter, start=start)
        small = basis.T @ dense  # [q, n]
        u, s, vh = torch.linalg.svd(small, full_matrices=False)
        left = (basis @ u[:, :k]) * s[:k]
        right = vh[:k]
    return left, right, relative_error(dense, left, right)


def relative_error(dense: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """‖D − L R‖_F / ‖D‖_F measured on the product (0 for D = 0), with float64 sums: a float32
    norm of a 2^20-element tensor is off by ~1e-5 of itself. The residual is formed ~1 MB of rows
    at a time (cache-sized: several times faster than one m×n temporary, and no such copy)."""
    m, n = dense.shape
    rows = max(16, (1 << 20) // (dense.element_size() * max(1, n)))
    left, right = left.to(dense.dtype), right.to(dense.dtype)
    res2 = norm2 = 0.0
    for r0 in range(0, m, rows):
        block = dense[r0 : r0 + rows]
        norm2 += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        res2 += (
            float(
                torch.linalg.vector_norm(
                    torch.addmm(block, left[r0 : r0 + rows], right, alpha=-1), dtype=torch.float64
                )
            )
            ** 2
        )
    return math.sqrt(res2 / norm2) if norm2 > 0.0 else 0.0


def _range_basis(
    dense: torch.Tensor,
    q: int,
    generator: torch.Generator | None,
    n_iter: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Halko et al.'s randomized range finder: an orthonormal ``[m, q]`` basis of D's leading
    column space, with ``n_iter`` QR-stabilised power iterations. ``start``: given columns of the
    initial block Y (the rest: D Ω for a Gaussian Ω)."""
    given = 0 if start is None else start.shape[1]
    omega = torch.randn(dense.shape[1], q - given, generator=generator, dtype=dense.dtype)
    y = dense @ omega
    if start is not None:
        y = torch.cat([start.to(dense.dtype), y], dim=1)
    basis, _ = torch.linalg.qr(y)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(dense.T @ basis)
        basis, _ = torch.linalg.qr(dense @ z)
    return basis


def auto_rank(s2: torch.Tensor, norm2: float, max_error: float) -> int | None:
    """The smallest k ≥ 1 with ‖D‖² − Σ_{j≤k} s_j² ≤ E²‖D‖² (``s2``: squared singular values of
    P D, descending; ``norm2`` = ‖D‖², so the out-of-span residual is included). None: no k
    within the basis reaches E."""
    if norm2 <= 0.0:
        return 1
    err2 = norm2 - torch.cumsum(s2.double(), 0)
    ok = torch.nonzero(err2 <= max_error**2 * norm2)
    return int(ok[0]) + 1 if ok.numel() else None


def out_of_span(s2: torch.Tensor, norm2: float) -> float:
    """ρ = ‖P⊥D‖ / ‖D‖ from all the squared singular values of P D."""
    if norm2 <= 0.0:
        return 0.0
    return math.sqrt(max(0.0, norm2 - float(s2.double().sum())) / norm2)


def refactor_auto(
    dense: torch.Tensor,
    max_error: float,
    *,
    generator: torch.Generator | None = None,
    start: int = 32,
    n_iter: int = 4,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors of a dense update at the smallest rank whose relative Frobenius error is ≤
    ``max_error`` (see the module docstring), and that error, measured on the product.

    Exact SVD for small matrices; otherwise a randomized basis of ``start`` columns, doubled
    until its out-of-span residual is ≤ ``AUTO_SPAN``·E (at half the smaller side: the exact
    SVD). ``info`` (if given) receives ``refactor`` (``svd`` | ``randomized svd``), ``basis`` and
    ``out_of_span``.
    """
    m, n = dense.shape
    norm2 = float(torch.linalg.vector_norm(dense, dtype=torch.float64)) ** 2
    if norm2 == 0.0:
        if info is not None:
            info.update(refactor="svd", basis=0, out_of_span=0.0)
        return dense.new_zeros(m, 1), dense.new_zeros(1, n), 0.0
    q = max(1, start)
    while True:
        if q >= min(m, n) // 2:
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            basis, how = None, "svd"
        else:
            basis = _range_basis(dense, q, generator, n_iter)
            u, s, vh = torch.linalg.svd(basis.T @ dense, full_matrices=False)
            how = "randomized svd"
        s2 = s.double().square()
        rho = out_of_span(s2, norm2)
        if basis is None:  # the exact SVD: its full rank is exact up to rounding
            k = auto_rank(s2, norm2, max_error) or s.numel()
            break
        k = auto_rank(s2, norm2, max_error) if rho <= AUTO_SPAN * max_error else None
        if k is not None:
            break
        q *= 2
    if basis is not None:
        u = basis @ u
    while True:  # the rule ran on singular values: confirm on the product (rounding)
        left, right = u[:, :k] * s[:k], vh[:k]
        error = float(
            torch.linalg.vector_norm(dense - left @ right, dtype=torch.float64)
        ) / math.sqrt(norm2)
        if error <= max_error or k >= s.numel():
            break
        k += 1
    if info is not None:
        info.update(refactor=how, basis=s.numel(), out_of_span=0.0 if basis is None else rho)
    return left.contiguous(), right.contiguous(), error
