"""Method parameters: defaults, ranges, per-adapter lists and mergekit's per-tensor filters.

The one place numbers given by the user (CLI options, recipe values, every branch of a filter
list) are checked — finite and in range — before any tensor is read: a NaN weight would
otherwise be accepted and written as a merge, and ``--density nan`` or ``--lambda inf`` fail
deep inside a method with a traceback.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import MergeInputError
from .methods import MergeMethod


def _pick(value: Any, module: str | None, source: str, name: str) -> Any:
    """Resolve mergekit's per-tensor filters: ``[{filter: substr, value: v}, …, {value: d}]``."""
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        for cond in value:
            unknown = set(cond) - {"filter", "value"}
            if unknown or "value" not in cond:
                raise MergeInputError(
                    f"{source}: '{name}' conditions take 'filter' and 'value' keys, got {sorted(cond)}"
                )
            if cond.get("filter") is None or (module is not None and cond["filter"] in module):
                return cond["value"]
        raise MergeInputError(f"{source}: '{name}' has no condition without a filter (a default)")
    return value


def finite_error(value: Any) -> str | None:
    """``must be a finite number, got nan`` for a NaN or infinite float, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None


def _check_value(p, value: Any, source: str) -> None:
    msg = finite_error(value) or p.check(value)
    if msg is not None:
        raise MergeInputError(f"{source}: '{p.name}' {msg}")


def _check_filters(p, value: Any, source: str) -> None:
    """Every branch of a mergekit filter list, not only the one the first tensor picks."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, list) and item and all(isinstance(c, dict) for c in item):
            _check_filters(p, item, source)
        elif isinstance(item, dict) and "value" in item:
            for v in item["value"] if isinstance(item["value"], list) else [item["value"]]:
                if v is not None:
                    _check_value(p, v, source)


def effective_gamma(resolved: dict[str, Any]) -> list[float]:
    """Breadcrumbs' outlier fraction as applied: min(gamma, 1 − density) per adapter.

    mergekit (``sparsify.magnitude_outliers``) keeps ``density`` and shrinks the outlier cut when
    density + gamma > 1 (n_bot = max(0, n − target − n_top)); we do the same, and the manifest
    records this value beside the given ``gamma`` so it says what was done. (Per tensor the
    counts are ``int(gamma·n)`` and ``n − int(density·n)``.)
    """
    return [
        g if d >= 1 else min(g, 1.0 - d) for d, g in zip(resolved["density"], resolved["gamma"])
    ]


def resolve_params(
    method: MergeMethod,
    n: int,
    params: dict[str, Any],
    *,
    source: str = "parameters",
    module: str | None = None,
) -> dict[str, Any]:
    """Fill defaults, check names and ranges, expand per-adapter values to lists of length n.

    ``params`` values of per-adapter parameters may be a scalar (all adapters) or a list of n;
    any value may be a mergekit filter list, resolved against the tensor name ``module``.
    """
    known = {p.name for p in method.params}
    for name in params:
        if name not in known:
            raise MergeInputError(
                f"{source}: '{name}' is not a parameter of {method.name} "
                f"(it takes: {', '.join(sorted(known))})"
            )
    resolved: dict[str, Any] = {}
    for p in method.params:
        if p.kind is not bool and p.name in params:
            _check_filters(p, params[p.name], source)
        value = _pick(params.get(p.name), module, source, p.name)
        if value is None:
            value = p.default
        if p.per_adapter:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise MergeInputError(
                    f"{source}: '{p.name}' has {len(values)} values for {n} adapters"
                )
            values = [_pick(v, module, source, p.name) for v in values]
            values = [p.default if v is None else v for v in values]
            for v in values:
                _check_value(p, v, source)
            resolved[p.name] = [float(v) for v in values]
        else:
            _check_value(p, value, source)
            resolved[p.name] = value
    if method.param("epsilon") is not None:
        for d, e in zip(resolved["density"], resolved["epsilon"]):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise MergeInputError(
                    f"{source}: density ± epsilon must lie in (0, 1), got density {d}, epsilon {e}"
                )
    if resolved.get("normalize") and abs(sum(resolved["weight"])) < 1e-8 and not method.sparse:
        raise MergeInputError(f"{source}: the weights sum to 0, cannot normalize")
    return resolved
