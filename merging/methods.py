"""Merge methods: pure functions on stacked task vectors, and the one registry of them.

Every method takes ``deltas`` (``[n_adapters, *shape]``, the task vectors of one tensor) and
``weights`` (``[n_adapters]``) and returns the merged update ``[*shape]``. Per-adapter parameters
(``density``, ``gamma``, ``epsilon``) arrive as sequences of length n; random methods get one
``torch.Generator`` per adapter so a seed gives the same bytes whatever the module order.

Semantics are mergekit's (``generalized_task_arithmetic.py``, ``sparsify.py``, ``linear.py`` of
mergekit 0.1.5), so an exported recipe run by mergekit gives the same weights. TIES is
sparsify → weight → sign consensus → masked mean; DARE-TIES is the same with a random sparsifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import sparsify as sp
from .spaces import SPACES


# -- shared pieces ---------------------------------------------------------------------------
def _weights_like(weights: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    return weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))


def sign_consensus(weighted: torch.Tensor, *, elect_from: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign (sign of the sum, ≥ 0 → +).

    ``weighted``: ``[n, *shape]``. Zero entries never agree (they were trimmed).
    ``elect_from`` defaults to ``weighted`` (mergekit: the sum of *weighted* deltas); the
    paper-faithful TIES elects from the unweighted trimmed deltas.
    """
    source = weighted if elect_from is None else elect_from
    majority = torch.where(source.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def mix(
    weighted: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Σ of the (masked) weighted deltas, divided by the (masked) weight sum when normalising."""
    if mask is not None:
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


def _sparsify_each(deltas: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([fn(i, deltas[i]) for i in range(deltas.shape[0])])


def _gta(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    sparsified: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    w = _weights_like(weights, sparsified)
    weighted = sparsified * w
    mask = sign_consensus(weighted) if consensus else None
    return mix(weighted, w, mask, normalize=normalize, lambda_=lambda_)


# -- methods ---------------------------------------------------------------------------------
def linear(deltas: torch.Tensor, weights: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Σ w_i τ_i, divided by Σ w_i when ``normalize`` (a weighted average of the models)."""
    w = _weights_like(weights, deltas)
    total = (deltas * w).sum(dim=0)
    return total / weights.sum() if normalize else total


def task_arithmetic(
    deltas: torch.Tensor, weights: torch.Tensor, *, lambda_: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """λ · Σ w_i τ_i (÷ Σ w_i when ``normalize``)."""
    return _gta(deltas, weights, deltas, consensus=False, normalize=normalize, lambda_=lambda_)


def ties(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    paper: bool = False,
) -> torch.Tensor:
    """TIES: trim each τ_i to its top ``density`` by |value|, elect signs, disjoint (weighted) mean.

    ``paper=True`` is Yadav et al. 2023 as written: the sign is elected from the unweighted
    trimmed deltas and the mean divides by the *count* of agreeing entries (weights still scale
    each contribution).
    """
    trimmed = _sparsify_each(deltas, lambda i, t: sp.magnitude(t, density[i], rescale=rescale))
    if not paper:
        return _gta(deltas, weights, trimmed, consensus=True, normalize=normalize, lambda_=lambda_)
    w = _weights_like(weights, trimmed)
    weighted = trimmed * w
    mask = sign_consensus(weighted, elect_from=trimmed) & (trimmed != 0)
    count = mask.sum(dim=0).clamp_min(1).to(trimmed.dtype)
    mixed = (weighted * mask).sum(dim=0)
    if normalize:
        mixed = mixed / count
    return mixed * lambda_ if lambda_ != 1 else mixed


def _dare(
    deltas: torch.Tensor, generators: Sequence[torch.Generator], density: Sequence[float],
    rescale: bool | str,
) -> torch.Tensor:
    if rescale == "density":
        return _sparsify_each(
            deltas, lambda i, t: sp.bernoulli_inverse(t, density[i], generator=generators[i])
        )
    return _sparsify_each(
        deltas,
        lambda i, t: sp.bernoulli(t, density[i], generator=generators[i], rescale=bool(rescale)),
    )


def dare_linear(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    generators: Sequence[torch.Generator], lambda_: float = 1.0, normalize: bool = False,
    rescale: bool | str = True,
) -> torch.Tensor:
    """DARE then task arithmetic. ``rescale``: true = keep L1 norm (mergekit), "density" = 1/p."""
    dropped = _dare(deltas, generators, density, rescale)
    return _gta(deltas, weights, dropped, consensus=False, normalize=normalize, lambda_=lambda_)


def dare_ties(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    generators: Sequence[torch.Generator], lambda_: float = 1.0, normalize: bool = False,
    rescale: bool | str = True,
) -> torch.Tensor:
    """DARE then TIES sign consensus and masked mean."""
    dropped = _dare(deltas, generators, density, rescale)
    return _gta(deltas, weights, dropped, consensus=True, normalize=normalize, lambda_=lambda_)


def _breadcrumbs(deltas, density, gamma, rescale):
    return _sparsify_each(
        deltas, lambda i, t: sp.magnitude_outliers(t, density[i], gamma=gamma[i], rescale=rescale)
    )


def breadcrumbs(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    gamma: Sequence[float], lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` and the smallest entries, then task arithmetic."""
    kept = _breadcrumbs(deltas, density, gamma, rescale)
    return _gta(deltas, weights, kept, consensus=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    gamma: Sequence[float], lambda_: float = 1.0, normalize: bool = False, rescale: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs sparsification with TIES sign consensus."""
    kept = _breadcrumbs(deltas, density, gamma, rescale)
    return _gta(deltas, weights, kept, consensus=True, normalize=normalize, lambda_=lambda_)


def _della(deltas, density, epsilon, generators, rescale):
    return _sparsify_each(
        deltas,
        lambda i, t: sp.della_magprune(
            t, density[i], epsilon=epsilon[i], generator=generators[i], rescale=rescale
        ),
    )


def della(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    epsilon: Sequence[float], generators: Sequence[torch.Generator], lambda_: float = 1.0,
    normalize: bool = True, rescale: bool = True,
) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), then TIES sign consensus."""
    kept = _della(deltas, density, epsilon, generators, rescale)
    return _gta(deltas, weights, kept, consensus=True, normalize=normalize, lambda_=lambda_)


def della_linear(
    deltas: torch.Tensor, weights: torch.Tensor, *, density: Sequence[float],
    epsilon: Sequence[float], generators: Sequence[torch.Generator], lambda_: float = 1.0,
    normalize: bool = False, rescale: bool = True,
) -> torch.Tensor:
    """DELLA MagPrune, then task arithmetic."""
    kept = _della(deltas, density, epsilon, generators, rescale)
    return _gta(deltas, weights, kept, consensus=False, normalize=normalize, lambda_=lambda_)


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One method parameter: its recipe name, type, default, range and scope."""

    name: str
    kind: type
    default: Any
    help: str
    per_adapter: bool = False
    low: float | None = None  # lower bound (exclusive unless low_inclusive)
    high: float | None = None  # inclusive upper bound
    low_inclusive: bool = False
    choices: tuple | None = None

    @property
    def range(self) -> str:
        if self.choices is not None:
            return "|".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
        if self.kind is bool:
            return "true|false"
        if self.low is None:
            return "any"
        return f"{'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}]"

    def check(self, value: Any) -> str | None:
        """An error sentence for a bad value, or None."""
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {list(self.choices)}, got {value!r}"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number, got {value!r}"
        too_low = self.low is not None and (
            value < self.low if self.low_inclusive else value <= self.low
        )
        if too_low or (self.high is not None and value > self.high):
            return f"must be in {self.range}, got {value}"
        return None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    summary: str
    params: tuple[Param, ...]
    #: False: the result is exactly Σ c_i τ_i, so adapter output stays exact in low rank.
    sparse: bool = True
    random: bool = False
    #: mergekit's merge_method for export (None: mergekit cannot express it).
    mergekit: str | None = None
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_WEIGHT = Param("weight", float, 1.0, "scale of this adapter's task vector", per_adapter=True)
_LAMBDA = Param("lambda", float, 1.0, "scale of the merged update")


def _density() -> Param:
    # mergekit's default (1.0: nothing dropped), so a recipe means the same in both tools.
    return Param("density", float, 1.0, "fraction of entries kept", per_adapter=True, low=0.0, high=1.0)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the (agreeing) weight sum")


def _rescale(default: bool, dare: bool = False) -> Param:
    if dare:
        return Param(
            "rescale", bool, default,
            "true: keep each task vector's L1 norm (mergekit); 'density': ×1/p as in the DARE paper; false: none",
            choices=(True, False, "density"),
        )
    return Param("rescale", bool, default, "rescale survivors to keep the L1 norm")


_GAMMA = Param("gamma", float, 0.01, "fraction of largest-magnitude outliers dropped (at most 1 − density: as mergekit, the cut shrinks so density is kept; the manifest records gamma_effective)", per_adapter=True, low=0.0, high=1.0, low_inclusive=True)
_EPSILON = Param("epsilon", float, 0.15, "spread of keep probabilities around density", per_adapter=True, low=0.0, high=1.0)

_SPACE = Param(
    "space", str, "dense", "where the method runs: the dense weights or a LoRA-native space",
    choices=("dense", *SPACES),
)

METHODS: dict[str, MergeMethod] = {
    m.name: replace(m, params=m.params + (_SPACE,))
    for m in (
        MergeMethod("linear", linear, "https://arxiv.org/abs/2203.05482",
                    "weighted average of task vectors", (_WEIGHT, _normalize(True)),
                    sparse=False, mergekit="linear"),
        MergeMethod("task_arithmetic", task_arithmetic, "https://arxiv.org/abs/2212.04089",
                    "λ · Σ w_i τ_i", (_WEIGHT, _LAMBDA, _normalize(False)),
                    sparse=False, mergekit="task_arithmetic"),
        MergeMethod("ties", ties, "https://arxiv.org/abs/2306.01708",
                    "trim by magnitude, elect sign, disjoint mean",
                    (_WEIGHT, _density(), _LAMBDA, _normalize(True), _rescale(False),
                     Param("paper", bool, False, "Yadav et al.'s rule: unweighted sign election, mean over the agreeing count")),
                    mergekit="ties"),
        MergeMethod("dare_linear", dare_linear, "https://arxiv.org/abs/2311.03099",
                    "random drop (seeded), then task arithmetic",
                    (_WEIGHT, _density(), _LAMBDA, _normalize(False), _rescale(True, dare=True)),
                    random=True, mergekit="dare_linear"),
        MergeMethod("dare_ties", dare_ties, "https://arxiv.org/abs/2311.03099",
                    "random drop (seeded), then TIES sign consensus",
                    (_WEIGHT, _density(), _LAMBDA, _normalize(False), _rescale(True, dare=True)),
                    random=True, mergekit="dare_ties"),
        MergeMethod("breadcrumbs", breadcrumbs, "https://arxiv.org/abs/2312.06795",
                    "drop outliers and small entries, then task arithmetic",
                    (_WEIGHT, _density(), _GAMMA, _LAMBDA, _normalize(False), _rescale(False)),
                    mergekit="breadcrumbs"),
        MergeMethod("breadcrumbs_ties", breadcrumbs_ties, "https://arxiv.org/abs/2312.06795",
                    "breadcrumbs sparsification with TIES sign consensus",
                    (_WEIGHT, _density(), _GAMMA, _LAMBDA, _normalize(False), _rescale(False)),
                    mergekit="breadcrumbs_ties"),
        MergeMethod("della", della, "https://arxiv.org/abs/2406.11617",
                    "magnitude-ranked random drop (MagPrune), then TIES sign consensus",
                    (_WEIGHT, _density(), _EPSILON, _LAMBDA, _normalize(True), _rescale(True)),
                    random=True, mergekit="della"),
        MergeMethod("della_linear", della_linear, "https://arxiv.org/abs/2406.11617",
                    "magnitude-ranked random drop (MagPrune), then task arithmetic",
                    (_WEIGHT, _density(), _EPSILON, _LAMBDA, _normalize(False), _rescale(True)),
                    random=True, mergekit="della_linear"),
    )
}

# SVD-based methods live in their own module; registered here so there is still one table.
from .svd_methods import SVD_METHODS  # noqa: E402

METHODS.update({m.name: replace(m, params=m.params + (_SPACE,)) for m in SVD_METHODS})
