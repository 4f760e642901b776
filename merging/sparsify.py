"""Sparsifiers: which entries of one task vector survive (mergekit ``sparsify.py`` semantics).

Each takes one task vector ``t`` (any shape) and returns it with dropped entries zeroed.
Selections by magnitude use an O(n) k-th value threshold instead of a full sort; ties at the
threshold are broken by position (lower flat index first), so results are deterministic.
Random sparsifiers take an explicit ``torch.Generator`` so a seed gives the same bytes.
"""

from __future__ import annotations

import torch

_EPS = 1e-7


def top_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``w`` (ties: lower flat index first)."""
    flat = w.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    need = k - int(mask.sum())
    if need > 0:
        at = flat == threshold
        mask |= at & (torch.cumsum(at, 0) <= need)
    return mask.reshape(w.shape)


def rescale_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` to the L1 norm of ``original`` (mergekit's ``rescale``, RescaleNorm.l1)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def _finish(t: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = t * mask
    return rescale_l1(t, masked) if rescale else masked


def magnitude(t: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the top ``density`` fraction by |value| (at least one entry); density ∈ (0, 1]."""
    if density >= 1:
        return t
    if t.numel() == 0:
        return t
    k = max(1, int(density * t.numel()))
    return _finish(t, top_mask(t.abs(), k), rescale)


def magnitude_outliers(
    t: torch.Tensor, density: float, *, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` outliers and the smallest, keep ``density``.

    Ascending by magnitude, entries of rank ``[n_bot, n_bot + target)`` survive, with
    ``target = int(density·n)``, ``n_top = int(gamma·n)``, ``n_bot = max(0, n − target − n_top)``
    (mergekit ≥ 0.1's rule; the old ``[n_bot:-n_top]`` slice zeroed the tensor when gamma = 0).
    When density + gamma > 1 the cut shrinks to the ``n − target`` largest entries: density is
    kept and the effective gamma is 1 − density (mergekit's rule; ``params.effective_gamma``).
    """
    if density >= 1:
        return t
    n = t.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = t.abs()
    # ranks [n_bot, n_bot+target) ascending == top (n - n_bot) minus top (n - n_bot - target)
    keep = top_mask(w, n - n_bot) & ~top_mask(w, n - n_bot - target)
    return _finish(t, keep, rescale)


def keep_draws(t: torch.Tensor, density: float, *, generator: torch.Generator) -> torch.Tensor:
    """Bool mask, each entry kept with probability ``density``.

    The same draws as ``torch.bernoulli(torch.full_like(t, density), generator=generator)`` (one
    uniform per element in row-major order, kept when below p) at a third of the cost, and the
    stream can be drawn block by block (``merging.streaming``) with the same result.
    """
    return torch.rand(t.shape, generator=generator, dtype=t.dtype) < density


def bernoulli(
    t: torch.Tensor, density: float, *, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; rescale to keep the L1 norm."""
    if density >= 1:
        return t
    return _finish(t, keep_draws(t, density, generator=generator), rescale)


def bernoulli_inverse(
    t: torch.Tensor, density: float, *, generator: torch.Generator
) -> torch.Tensor:
    """DARE as in the paper (Yu et al. 2023): keep with probability p, survivors × 1/p."""
    if density >= 1:
        return t
    return t * keep_draws(t, density, generator=generator) / density


def della_magprune(
    t: torch.Tensor,
    density: float,
    *,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank.

    p = (density − ε) + 2ε · (rank − 1)/(cols − 1), so the row keeps ``density`` on average;
    ``density ± epsilon`` must lie in (0, 1).
    """
    if density >= 1:
        return t
    shape = t.shape
    rows = t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(rows.dtype)
    cols = rows.shape[1]
    rank_norm = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    return _finish(rows, mask, rescale).reshape(shape)
