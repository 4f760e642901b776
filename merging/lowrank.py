"""Low-rank algebra for adapter outputs: exact concatenation, core compression, refactorisation.

All updates are weight-shaped products ``L @ R`` (``L: [out, r]``, ``R: [r, in]``).
"""

from __future__ import annotations

import torch


def concat(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ c_k L_k R_k as one product: ``[c_1 L_1 | c_2 L_2 | …] @ [R_1; R_2; …]`` (exact)."""
    left = torch.cat([c * L for L, _, c in terms], dim=1)
    right = torch.cat([R for _, R, _ in terms], dim=0)
    return left, right


def compress(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
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
    total = float(s.square().sum())
    return (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0


def refactor(
    dense: torch.Tensor, rank: int, *, generator: torch.Generator | None = None, oversample: int = 10,
    n_iter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors of a dense update by randomized truncated SVD, and the relative error.

    Halko et al.'s range finder with ``oversample`` extra columns and ``n_iter`` power iterations
    (QR-stabilised), seeded so the result is reproducible. Small matrices take an exact SVD.
    The error is measured on the actual product: ‖D − L'R'‖_F / ‖D‖_F.
    """
    m, n = dense.shape
    k = min(rank, m, n)
    norm = torch.linalg.matrix_norm(dense)
    if float(norm) == 0.0:
        return dense.new_zeros(m, k), dense.new_zeros(k, n), 0.0
    q = min(k + oversample, m, n)
    if q >= min(m, n) // 2:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        left, right = u[:, :k] * s[:k], vh[:k]
    else:
        omega = torch.randn(n, q, generator=generator, dtype=dense.dtype)
        y = dense @ omega
        basis, _ = torch.linalg.qr(y)
        for _ in range(n_iter):
            z, _ = torch.linalg.qr(dense.T @ basis)
            basis, _ = torch.linalg.qr(dense @ z)
        small = basis.T @ dense  # [q, n]
        u, s, vh = torch.linalg.svd(small, full_matrices=False)
        left = (basis @ u[:, :k]) * s[:k]
        right = vh[:k]
    error = float(torch.linalg.matrix_norm(dense - left @ right) / norm)
    return left, right, error
