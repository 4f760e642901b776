"""What the streamed path does for a method: built only from its ``MergeMethod`` fields.

A method is streamed when it declares itself ``streamable`` (its ``fn`` is ``sparsifier`` →
weight → ``consensus`` → ``methods.mix``, element-wise) and none of its ``unstreamed_when``
flags is set. Per adapter, its ``sparsifier`` and the resolved parameters (``density``,
``gamma``, ``epsilon``, ``rescale``) give a spec; the stats pass (``selection``) turns it into a
``Plan`` — the exact thresholds or masks the mix pass (``single_pass``) applies block by block.
No method is named here (tests/merging/test_method_registry.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..methods import Consensus, MergeMethod, Sparsifier
from .selection import (
    TopK,
    _ratio,
    _stats_magnitude,
    _stats_random,
)

Factors = tuple[torch.Tensor, torch.Tensor]

#: sparsifiers that keep a band of ranks by |value| (one or two exact top-k selections)
TOP_K = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)


def method_of(method: MergeMethod | str) -> MergeMethod | None:
    """The registered method (a name is looked up in the registry; None when unknown)."""
    if isinstance(method, MergeMethod):
        return method
    from ..registry import get

    return get(method)


def supports(method: MergeMethod | str, resolved: dict[str, Any]) -> bool:
    """True when ``merge_dense``/``merge_factors`` compute this method with these parameters."""
    m = method_of(method)
    if m is None or not m.streamable or resolved.get("space", "dense") != "dense":
        return False
    return not any(resolved.get(flag) for flag in m.unstreamed_when)


def streamed_method(method: MergeMethod | str, resolved: dict[str, Any]) -> MergeMethod:
    """``method`` as a ``MergeMethod`` the streamed path computes, else ValueError."""
    m = method_of(method)
    if m is None or not supports(m, resolved):
        raise ValueError(
            f"{getattr(m, 'name', method)}: not a streamed method (with these parameters)"
        )
    return m


def by_sign(method: MergeMethod) -> bool:
    """The mix keeps the entries agreeing with the elected sign (the fused consensus kernel)."""
    return method.consensus is Consensus.SIGN


@dataclass
class Plan:
    """How adapter i is sparsified in the mix pass (after the stats pass filled it in)."""

    kind: str  # "none" | "zero" | "topk" | "band" | "mask"
    keep: TopK | None = None  # topk / band: the kept top-k
    drop: TopK | None = None  # band: the dropped top-k (breadcrumbs' outliers)
    mask: torch.Tensor | None = None  # mask: bool [out, in]
    scale: torch.Tensor | None = None  # rescale factor (0-dim, dtype), applied after the mask
    divide: float | None = None  # bernoulli_inverse: ÷ density


def adapter_spec(
    method: MergeMethod, resolved: dict, i: int, numel: int
) -> tuple[Sparsifier, dict]:
    """Adapter i's sparsifier and what its stats need (``sparsify.py``'s rules, per tensor of
    ``numel`` entries): ``ks`` (top-k counts; a band keeps the first minus the second), ``p``
    (keep probability), ``eps`` (MagPrune's spread), ``rescale``."""
    density = resolved.get("density", [1.0] * (i + 1))[i]
    kind = method.sparsifier
    if kind is Sparsifier.NONE or density >= 1:
        return Sparsifier.NONE, {}
    rescale = resolved["rescale"]
    if kind is Sparsifier.MAGNITUDE:
        return kind, {"ks": [max(1, int(density * numel))], "rescale": rescale}
    if kind is Sparsifier.MAGNITUDE_OUTLIERS:
        target = int(density * numel)
        n_top = int(resolved["gamma"][i] * numel)
        n_bot = max(0, numel - target - n_top)
        return kind, {"ks": [numel - n_bot, numel - n_bot - target], "rescale": rescale}
    if kind is Sparsifier.RANDOM_DROP:
        return kind, {"p": density, "rescale": rescale}
    if kind is Sparsifier.MAGPRUNE:
        return kind, {"p": density, "eps": resolved["epsilon"][i], "rescale": rescale}
    raise ValueError(f"{method.name}: sparsifier {kind.value} has no streamed plan")


def magnitude_plan(
    f: Factors, spec: dict, blocks: Sequence[tuple[int, int]], exact_below: int, dtype: torch.dtype
) -> Plan:
    """The exact top-k (or band) plan of τ = L R, with its rescale factor."""
    ks, rescale = spec["ks"], spec["rescale"]
    descs = _stats_magnitude(f[0], f[1], ks, rescale, blocks, exact_below)
    keep = descs[0]
    drop = descs[1] if len(descs) > 1 else None
    scale = None
    if rescale:
        total = keep.total_abs_sum
        if total is None:  # dense selection: Σ|τ| of everything
            total = float((f[0] @ f[1]).abs().sum(dtype=torch.float64))
        kept = keep.kept_abs_sum - (
            drop.kept_abs_sum if drop is not None and not drop.nothing else 0.0
        )
        scale = _ratio(total, kept, dtype)
    if drop is None:
        if keep.everything:
            return Plan("none", scale=scale)
        if keep.nothing:
            return Plan("zero")
        return Plan("topk", keep=keep, scale=scale)
    if keep.nothing or (drop.everything):
        return Plan("zero")
    return Plan("band", keep=keep, drop=drop, scale=scale)


def random_plan(
    f: Factors,
    spec: dict,
    gen: torch.Generator,
    shape: tuple[int, int],
    blocks: Sequence[tuple[int, int]],
    dtype: torch.dtype,
) -> Plan:
    """The drawn keep mask of τ = L R (``spec["kind"]``: the random sparsifier), with its rescale
    factor or DARE's 1/p."""
    mask, before, after = _stats_random(f[0], f[1], shape, spec, gen, blocks)
    if spec["kind"] is Sparsifier.RANDOM_DROP and spec["rescale"] == "density":
        return Plan("mask", mask=mask, divide=spec["p"])
    scale = _ratio(before, after, dtype) if spec["rescale"] else None
    return Plan("mask", mask=mask, scale=scale)
