"""Merge methods: pure functions on stacked task vectors, and what a method is (``MergeMethod``).

The registry (name → ``MergeMethod``) is built in ``registry.py``; adding a method is one
function here (or in ``svd_methods.py``) and one entry there (DESIGN.md, How to add a method).

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
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from . import sparsify as sp


# -- shared pieces ---------------------------------------------------------------------------
def _weights_like(weights: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    return weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))


def sign_consensus(
    weighted: torch.Tensor, *, elect_from: torch.Tensor | None = None
) -> torch.Tensor:
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ of the (masked) weighted deltas, divided by the (masked) weight sum when normalising.

    ``out``: the result is written there, in place (summed into it directly when unmasked) — the
    streamed path mixes
    each row block into its output buffer with this very function (the same operations, so the
    same bytes as the dense path).
    """
    if mask is not None:
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0) if out is None else torch.sum(weighted, 0, out=out)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if out is not None:
        if mask is not None:
            out.copy_(mixed)
        if normalize:
            out.div_(divisor)
        if lambda_ != 1:
            out.mul_(lambda_)
        return out
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


def _sparsify_each(
    deltas: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
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
    deltas: torch.Tensor,
    generators: Sequence[torch.Generator],
    density: Sequence[float],
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
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    generators: Sequence[torch.Generator],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | str = True,
) -> torch.Tensor:
    """DARE then task arithmetic. ``rescale``: true = keep L1 norm (mergekit), "density" = 1/p."""
    dropped = _dare(deltas, generators, density, rescale)
    return _gta(deltas, weights, dropped, consensus=False, normalize=normalize, lambda_=lambda_)


def dare_ties(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    generators: Sequence[torch.Generator],
    lambda_: float = 1.0,
    normalize: bool = False,
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
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    gamma: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` and the smallest entries, then task arithmetic."""
    kept = _breadcrumbs(deltas, density, gamma, rescale)
    return _gta(deltas, weights, kept, consensus=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    gamma: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
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
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    epsilon: Sequence[float],
    generators: Sequence[torch.Generator],
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), then TIES sign consensus."""
    kept = _della(deltas, density, epsilon, generators, rescale)
    return _gta(deltas, weights, kept, consensus=True, normalize=normalize, lambda_=lambda_)


def della_linear(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: Sequence[float],
    epsilon: Sequence[float],
    generators: Sequence[torch.Generator],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> torch.Tensor:
    """DELLA MagPrune, then task arithmetic."""
    kept = _della(deltas, density, epsilon, generators, rescale)
    return _gta(deltas, weights, kept, consensus=False, normalize=normalize, lambda_=lambda_)


# -- what a method is -----------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One method parameter: its recipe name, type, default, range and scope.

    ``help`` is the sentence the method commands show for its option (``emomerge ties --help``:
    the options are generated from the parameters, ``emomerge/cli_merge.py``); one parameter
    name has one meaning, so every method declaring it gives the same ``help``.
    """

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
            return (
                None
                if value in self.choices
                else f"must be one of {list(self.choices)}, got {value!r}"
            )
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


class Sparsifier(str, Enum):
    """Which entries of each τ_i survive before the mix (``sparsify.py``), as the streamed path
    (``merging/streaming/plans.py``) recomputes it block by block. Each reads the per-adapter
    ``density`` and the ``rescale`` parameter; the others name what else they read."""

    NONE = "none"  # every entry kept
    MAGNITUDE = "magnitude"  # top density·n by |value| (sparsify.magnitude)
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # + the top ``gamma`` dropped (Breadcrumbs)
    RANDOM_DROP = "random_drop"  # kept with probability density (DARE; rescale may be "density")
    MAGPRUNE = "magprune"  # per-row, magnitude-ranked keep probabilities ± ``epsilon`` (DELLA)

    @property
    def random(self) -> bool:
        """Draws from the per-adapter generators."""
        return self in (Sparsifier.RANDOM_DROP, Sparsifier.MAGPRUNE)

    @property
    def reads(self) -> frozenset[str]:
        """The parameters the streamed plan reads for it (merging/streaming/plans.py)."""
        extra = {Sparsifier.MAGNITUDE_OUTLIERS: {"gamma"}, Sparsifier.MAGPRUNE: {"epsilon"}}
        if self is Sparsifier.NONE:
            return frozenset()
        return frozenset({"density", "rescale", *extra.get(self, ())})


class Consensus(str, Enum):
    """How the sparsified, weighted deltas are combined (``mix``)."""

    NONE = "none"  # Σ w_i τ_i (÷ Σ w_i when normalising) × λ
    SIGN = "sign"  # TIES: entries agreeing with the elected sign of Σ w_i τ_i, masked mean


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (``merging/registry.py``): its function, its parameters, and
    what the rest of the package needs to know about it — the streamed path builds its plan
    from ``sparsifier``, ``consensus`` and ``streamable`` alone, never from the name."""

    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    summary: str
    params: tuple[Param, ...]
    #: True: the result is exactly Σ c_i τ_i (c from the parameters), so adapter output stays
    #: exact in low rank (``engine.exact_coefficients``). False: a "sparse" method.
    linear: bool = False
    #: draws from one seeded ``torch.Generator`` per adapter (``generators=`` keyword)
    random: bool = False
    #: the sparsifier and consensus ``fn`` applies (what the streamed path recomputes)
    sparsifier: Sparsifier = Sparsifier.NONE
    consensus: Consensus = Consensus.NONE
    #: the streamed path (``merging/streaming``) computes it from the LoRA factors block by
    #: block: ``fn`` is ``sparsifier`` → weight → ``consensus`` → ``mix``, element-wise
    streamable: bool = False
    #: boolean parameters that, when true, take it off the streamed path (TIES' ``paper`` rule)
    unstreamed_when: tuple[str, ...] = ()
    #: mergekit's merge_method for export (None: mergekit cannot express it).
    mergekit: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sparsifier.random and not self.random:
            raise ValueError(f"{self.name}: a random sparsifier needs random=True")

    @property
    def sparse(self) -> bool:
        """Not linear in its inputs: adapter output is re-factorised (the engine's word)."""
        return not self.linear

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
