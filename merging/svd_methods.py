"""LoRA-native, SVD-based merge methods (TSV-Merge, Iso-C, Iso-CTS): registered in registry.py.

Each works per weight matrix on the singular vectors of the task vectors, so each commutes with
the isometric ``core`` and ``knots`` projections (the same singular vectors, expressed in a
smaller basis): run there, they give the dense result at O((Σr)³) instead of O(out·in·min).

One adaptation to LoRA, shared by all three: the papers' full fine-tunes give full-rank task
matrices, so their code counts singular directions up to ``min(out, in)``. A LoRA update has rank
r ≪ min(out, in); its remaining "singular vectors" are arbitrary and its remaining singular values
are rounding noise. We count only the numerical support (σ > √eps · scale): on full-rank inputs
this is exactly the papers' rule, on LoRA inputs it keeps the result in the span of the updates
(so still exact low rank) and makes it the same in every space.

Weights scale each task vector before anything else (τ_i ← w_i τ_i); a task whose update is zero
in a module (weight 0, or no LoRA there) takes no part, and ``n`` counts the others.
"""

from __future__ import annotations

import torch


# -- shared pieces ---------------------------------------------------------------------------
def _svd(
    x: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``x`` cut to its numerical support: σ > √eps · ``scale`` (default σ_1).

    √eps, not eps·dim: rounding in B @ A (float32) leaves singular values near 1e-6·σ_1, which
    isotropic scaling would otherwise inflate to the mean; a dimension-free tolerance also keeps
    the cut the same in the dense and the projected spaces.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    ref = float(s[0]) if scale is None and s.numel() else (scale or 0.0)
    keep = int((s > torch.finfo(x.dtype).eps ** 0.5 * ref).sum()) if ref > 0 else 0
    return u[:, :keep], s[:keep], vh[:keep]


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``x`` (Procrustes): P Qᵀ for x = P S Qᵀ."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _weighted_tasks(deltas: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """w_i τ_i for every task whose weighted update is not zero."""
    w = weights.to(deltas.dtype)
    return [w[i] * deltas[i] for i in range(deltas.shape[0]) if w[i] != 0 and bool(deltas[i].any())]


def _not_a_matrix(deltas: torch.Tensor, weights: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Non-2-D tensors have no singular vectors: λ · mean_i w_i τ_i, as the reference codes do."""
    w = weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    return lambda_ * (deltas * w).mean(dim=0)


# -- methods ---------------------------------------------------------------------------------
def tsv(
    deltas: torch.Tensor, weights: torch.Tensor, *, fraction: float = 0.0, lambda_: float = 1.0
) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025; code: compute_and_sum_svd_mem_reduction): decorrelate.

    τ_i = U_i Σ_i V_iᵀ, each cut to its top k_i = max(1, ⌊f · rank τ_i⌋) components (TSV-C);
    Û = [U_1 … U_n], Σ̂ = diag(Σ_1 … Σ_n), V̂ = [V_1 … V_n];
    merged = λ · polar(Û) Σ̂ polar(V̂)ᵀ with polar(X) = P Qᵀ for X = P S Qᵀ (Procrustes).
    ``fraction`` f ∈ [0, 1], 0 meaning 1/n (the paper's choice); ``lambda`` λ = the paper's α (1).
    """
    if deltas.dim() != 3:
        return _not_a_matrix(deltas, weights, lambda_)
    tasks = _weighted_tasks(deltas, weights)
    if not tasks:
        return deltas.new_zeros(deltas.shape[1:])
    f = fraction or 1.0 / len(tasks)
    us, ss, vhs = [], [], []
    for tau in tasks:
        u, s, vh = _svd(tau)
        k = max(1, int(f * s.numel()))
        us.append(u[:, :k]), ss.append(s[:k]), vhs.append(vh[:k])
    u_hat = _polar(torch.cat(us, dim=1))  # [out, Σk]
    v_hat = _polar(torch.cat(vhs, dim=0).T)  # [in, Σk]
    return lambda_ * (u_hat * torch.cat(ss)) @ v_hat.T


def iso_c(deltas: torch.Tensor, weights: torch.Tensor, *, lambda_: float = 1.0) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, §4; code: iso_c): task arithmetic with a flat spectrum.

    Δ = Σ_i w_i τ_i = U Σ Vᵀ (rank R); merged = λ · σ̄ U Vᵀ with σ̄ = (1/R) Σ_j σ_j.
    ``lambda`` λ = the paper's α (tuned on validation there; 1 here).
    """
    if deltas.dim() != 3:
        return _not_a_matrix(deltas, weights, lambda_)
    u, s, vh = _svd((deltas * weights.to(deltas.dtype).reshape(-1, 1, 1)).sum(dim=0))
    if s.numel() == 0:
        return deltas.new_zeros(deltas.shape[1:])
    return lambda_ * s.mean() * (u @ vh)


def _cts_split(rank: int, n: int, common_fraction: float) -> tuple[int, int]:
    """(common dims, dims per task): the reference's rounding, never a negative common part.

    Reference: per task round((R − ⌊R·f⌋) / n), common = R − n · per task; capped at R // n.
    """
    per_task = min(rank // n, round((rank - int(rank * common_fraction)) / n))
    return rank - n * per_task, per_task


def iso_cts(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    common_space_fraction: float = 0.8,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, §4; code: iso_cts): flat spectrum, common + task subspaces.

    Δ = Σ w_i τ_i = U Σ Vᵀ (rank R); common part: its top k directions U_c, Σ_c, V_c;
    each task outside it: τ̄_i = τ_i − U_c U_cᵀ τ_i, top s directions Ū_i, Σ̄_i, V̄_i
    (k, s from ``common_space_fraction`` f: s = round((R − ⌊fR⌋)/n), k = R − n·s);
    U* = polar[U_c Ū_1 … Ū_n], V* = polar[V_c V̄_1 … V̄_n]; merged = λ · σ̄ U* V*ᵀ with σ̄ the
    mean of [Σ_c Σ̄_1 … Σ̄_n] (the reference code's). f = 1 is Iso-C; the paper's f is 0.8.
    """
    if deltas.dim() != 3:
        return _not_a_matrix(deltas, weights, lambda_)
    tasks = _weighted_tasks(deltas, weights)
    if not tasks:
        return deltas.new_zeros(deltas.shape[1:])
    u, s, vh = _svd(torch.stack(tasks).sum(dim=0))
    if s.numel() == 0:
        return deltas.new_zeros(deltas.shape[1:])
    k, per_task = _cts_split(s.numel(), len(tasks), common_space_fraction)
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    for tau in tasks:
        # scale = ‖τ_i‖_F: a task lying inside the common subspace leaves only noise behind
        outside = tau - u[:, :k] @ (u[:, :k].T @ tau)
        u_i, s_i, vh_i = _svd(outside, scale=float(torch.linalg.norm(tau)))
        us.append(u_i[:, :per_task]), ss.append(s_i[:per_task]), vhs.append(vh_i[:per_task])
    u_star = _polar(torch.cat(us, dim=1))  # [out, ≤R]
    v_star = _polar(torch.cat(vhs, dim=0).T)  # [in, ≤R]
    return lambda_ * torch.cat(ss).mean() * (u_star @ v_star.T)
