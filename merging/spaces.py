"""Merge spaces: where a method sees the task vectors of one module.

``dense`` is the weight space itself. A LoRA-native space maps each task vector losslessly to a
small tensor, the method runs there, and the result maps back to an exact low-rank update:

- ``core`` (Panariello, Marczak et al., NeurIPS 2025, arXiv 2509.17786): orthonormal bases
  U_B (left singular vectors of the stacked B factors ``[out, Σr]``) and V_A (right singular
  vectors of the stacked A factors ``[Σr, in]``); core M_i = U_Bᵀ ΔW_i V_A (``Σr × Σr``) and
  ΔW_i = U_B M_i V_Aᵀ exactly. Cost O((out + in)·(Σr)²), independent of out × in.
- ``knots`` (Stoica et al., ICLR 2025, arXiv 2410.19735): one SVD of the updates side by side,
  ``[ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ]``; task i is its block ``Σ V_iᵀ`` (``k × in``, Σ folded
  in as the reference code's default ``s_on_V``) and a merged block M maps back to ``U M``.
  Computed from the factors: cost O(out·(Σr)² + n·in·(Σr)²), never an out × n·in SVD.

A space is a function ``project(factors, shape) -> (stacked, back)``: ``factors`` holds each
adapter's ``(L, R)`` (or None), ``stacked`` is ``[n, a, b]`` and ``back(merged)`` returns the
weight-shaped low-rank factors ``(L, R)`` of a merged ``[a, b]`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]
Back = Callable[[torch.Tensor], Factors]


def _present(factors: Sequence[Factors | None], shape, dtype) -> list[Factors]:
    zero = (torch.zeros(shape[0], 1, dtype=dtype), torch.zeros(1, shape[1], dtype=dtype))
    return [f if f is not None else zero for f in factors]


def core_project(
    factors: Sequence[Factors | None], shape: tuple[int, int]
) -> tuple[torch.Tensor, Back]:
    """Core space: lossless projection of every update onto the shared factor bases."""
    dtype = next(f[0].dtype for f in factors if f is not None)
    fs = _present(factors, shape, dtype)
    b_stack = torch.cat([L for L, _ in fs], dim=1)  # [out, Σr]
    a_stack = torch.cat([R for _, R in fs], dim=0)  # [Σr, in]
    u_b = torch.linalg.svd(b_stack, full_matrices=False).U  # [out, k]
    v_a = torch.linalg.svd(a_stack, full_matrices=False).Vh.T  # [in, k']
    cores = torch.stack([(u_b.T @ L) @ (R @ v_a) for L, R in fs])  # [n, k, k']

    def back(merged: torch.Tensor) -> Factors:
        return u_b @ merged, v_a.T.contiguous()

    return cores, back


def _support(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Numerical rank of a spectrum (numpy's ``matrix_rank`` tolerance): at least 1."""
    tol = s.max() * max(shape) * torch.finfo(s.dtype).eps
    return max(1, int((s > tol).sum()))


def knots_project(
    factors: Sequence[Factors | None], shape: tuple[int, int]
) -> tuple[torch.Tensor, Back]:
    """KnOTS space: each update's right singular block ``Σ V_iᵀ`` of the joint SVD of the updates.

    With ``L_cat = [L_1 … L_n] = Q T`` (reduced QR) and ``T = [T_1 … T_n]`` split like L_cat,
    ``[L_1R_1 … L_nR_n] = Q · [T_1R_1 … T_nR_n]``; the SVD of that small ``[≤Σr, n·in]`` matrix
    ``P Σ Wᵀ`` gives ``U = Q P`` and ``Σ [V_1ᵀ … V_nᵀ] = Σ Wᵀ``, so block i equals ``Uᵀ ΔW_i``
    and ``U · block_i = ΔW_i`` (U spans every update's columns). Directions with σ at rounding
    level are dropped, as the reference code drops σ ≤ 1e-5: they carry no update.
    """
    dtype = next(f[0].dtype for f in factors if f is not None)
    fs = _present(factors, shape, dtype)
    q, t = torch.linalg.qr(torch.cat([L for L, _ in fs], dim=1))  # [out, m], [m, Σr]
    t_blocks = t.split([L.shape[1] for L, _ in fs], dim=1)
    joint = torch.cat([t_i @ R for t_i, (_, R) in zip(t_blocks, fs)], dim=1)  # Qᵀ[ΔW_1 … ΔW_n]
    p, s, wh = torch.linalg.svd(joint, full_matrices=False)
    k = _support(s, joint.shape)
    u = q @ p[:, :k]  # [out, k]
    blocks = torch.stack((s[:k, None] * wh[:k]).split(shape[1], dim=1))  # [n, k, in]

    def back(merged: torch.Tensor) -> Factors:
        return u, merged

    return blocks, back


SPACES: dict[str, Callable[..., tuple[torch.Tensor, Back]]] = {
    "core": core_project,
    "knots": knots_project,
}
