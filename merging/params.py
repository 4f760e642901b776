"""Method parameters: defaults, ranges, per-adapter lists and mergekit's per-tensor filters."""

from __future__ import annotations

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


def resolve_params(
    method: MergeMethod, n: int, params: dict[str, Any], *, source: str = "parameters",
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
                if (msg := p.check(v)) is not None:
                    raise MergeInputError(f"{source}: '{p.name}' {msg}")
            resolved[p.name] = [float(v) for v in values]
        else:
            if (msg := p.check(value)) is not None:
                raise MergeInputError(f"{source}: '{p.name}' {msg}")
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
