"""Merge spaces: where a method sees the task vectors of one module.

``dense`` is the weight space itself. A LoRA-native space maps each task vector losslessly to a
small tensor, the method runs there, and the result maps back to an exact low-rank update:

- ``core`` (Panariello, Marczak et al., NeurIPS 2025, arXiv 2509.17786): orthonormal bases
  U_B (left singular vectors of the stacked B factors ``[out, Σr]``) and V_A (right singular
  vectors of the stacked A factors ``[Σr, in]``); core M_i = U_Bᵀ ΔW_i V_A (``Σr × Σr``) and
  ΔW_i = U_B M_i V_Aᵀ exactly. Cost O((out + in)·(Σr)²), independent of out × in.

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


def core_project(factors: Sequence[Factors | None], shape: tuple[int, int]) -> tuple[torch.Tensor, Back]:
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


SPACES: dict[str, Callable[..., tuple[torch.Tensor, Back]]] = {
    "core": core_project,
}
