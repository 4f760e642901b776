"""Merge recipes in mergekit's YAML schema: validate, run natively, export for mergekit.

A recipe::

    merge_method: ties
    base_model: Qwen/Qwen2.5-VL-7B-Instruct      # needed for full output and for export
    models:
      - model: runs/demo/adapters/emoart         # an adapter folder, or mergekit's base+adapter
        parameters: {weight: 0.3, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    emomerge: {output: adapter, rank: 16, seed: 0, reference: base}   # ours; dropped on export
    # or rank: auto with max_error: 0.05 (per module the smallest rank with error ≤ 5%)
    # refactor: best (fixed rank): the closer of the projection and a truncated SVD per module

Relative paths resolve against ``root`` (default: the current folder, as in mergekit).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from .config import Strict, key_error, load_yaml, shown_key, validate
from .engine import MergeResult, get_method, merge, resolve_params
from .errors import MergeInputError
from .taskvectors import build_task_vectors

Scalar = float | int | bool | str
ParamValue = Scalar | list[Any] | None


class ModelEntry(Strict):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class EmomergeOptions(Strict):
    """emomerge's own settings (mergekit has no equivalent; dropped on export)."""

    output: Literal["adapter", "full"] = "adapter"
    rank: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    max_error: float | None = None  # with rank: auto
    refactor: Literal["projection", "best"] = "projection"  # with a fixed rank (``--refactor``)
    seed: int = 0
    reference: Literal["base", "previous"] = "base"
    layout: Literal["new", "qwen-legacy", "llava-legacy", "text"] | None = None

    @field_validator("rank", mode="wrap")
    @classmethod
    def _rank(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # one problem for the union (an integer ≥ 1 or 'auto'), not one per member
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(f"must be a positive integer or auto, got {v!r}") from None


class Recipe(Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    #: mergekit's pair. emomerge computes in float32 (float64 when ``dtype`` says so) and names the
    #: *stored* dtype with the rest: ``out_dtype``, else a narrower ``dtype`` (see ``dtypes``).
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    out_dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    tokenizer_source: str | None = None
    emomerge: EmomergeOptions = Field(default_factory=EmomergeOptions)


def dtypes(recipe: Recipe) -> tuple[str, str | None]:
    """``(compute dtype, stored dtype or None)`` of a recipe — one rule both ways.

    A merge is always computed in float32 (float64 when ``dtype: float64``): a bf16/fp16 merge
    would round every partial sum, and mergekit's bf16 task vectors are themselves rounded
    differently from ours, so no two tools agree in bf16. ``dtype: bfloat16`` / ``float16`` names
    the dtype the weights are *stored* in; ``out_dtype`` overrides it. The export writes
    ``dtype: float32`` plus that ``out_dtype``, which is what mergekit then computes too.
    """
    compute = "float64" if recipe.dtype == "float64" else "float32"
    narrow = recipe.dtype if recipe.dtype in ("bfloat16", "float16") else None
    return compute, recipe.out_dtype or narrow


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; errors name the file and the key (DESIGN.md,
    Configuration)."""
    path = Path(path)
    raw = load_yaml(path, what="recipe file")
    if "slices" in raw:
        raise key_error(path, "slices", "slice-wise recipes are not supported (use models)")
    recipe = validate(Recipe, raw, path)
    _check_rank_options(recipe.emomerge, path)
    method = _method_or_error(recipe.merge_method, path)
    try:
        params = recipe_params(recipe, method)
    except MergeInputError as exc:
        raise MergeInputError(f"{path}: {exc}") from exc
    resolve_params(method, len(recipe.models), params, source=str(path))
    return recipe


def _check_rank_options(opts: EmomergeOptions, path: Path) -> None:
    if opts.rank == "auto" and opts.max_error is None:
        raise key_error(
            path,
            "emomerge.rank",
            "auto needs emomerge.max_error (the largest "
            "relative Frobenius error per module, in (0, 1))",
        )
    if opts.refactor == "best" and opts.rank == "auto":
        raise key_error(
            path,
            "emomerge.refactor",
            "best needs a fixed emomerge.rank (rank: auto "
            "already picks the projection or the SVD per module)",
        )
    if opts.max_error is not None:
        if opts.rank != "auto":
            raise key_error(path, "emomerge.max_error", "needs emomerge.rank: auto")
        if not (math.isfinite(opts.max_error) and 0 < opts.max_error < 1):
            raise key_error(
                path, "emomerge.max_error", f"must be a number in (0, 1), got {opts.max_error!r}"
            )


def _method_or_error(name: str, path: Path):
    try:
        return get_method(name)
    except MergeInputError as exc:
        raise key_error(path, "merge_method", str(exc)) from exc


def recipe_params(recipe: Recipe, method) -> dict[str, Any]:
    """mergekit's parameter scoping: per-model values override the global ``parameters``."""
    params: dict[str, Any] = {}
    for p in method.params:
        if p.per_adapter:
            per = [m.parameters.get(p.name, recipe.parameters.get(p.name)) for m in recipe.models]
            if any(v is not None for v in per):
                params[p.name] = per
        elif p.name in recipe.parameters:
            params[p.name] = recipe.parameters[p.name]
    known = {p.name for p in method.params} | {"int8_mask"}
    for scope, keys in [("parameters", recipe.parameters)] + [
        (f"models.{i}.parameters", m.parameters) for i, m in enumerate(recipe.models)
    ]:
        for key in keys:
            if key not in known:
                raise MergeInputError(
                    f"key '{scope}.{shown_key(key)}': not a parameter of {method.name} "
                    f"(it takes: {', '.join(sorted(known - {'int8_mask'}))})"
                )
    return params


def adapter_path(model: str, base_model: str | None, root: Path) -> Path:
    """The adapter folder of a recipe model (``adapter`` or mergekit's ``base+adapter``)."""
    if "+" in model:
        base, adapter = model.split("+", 1)
        if base_model is not None and base.rstrip("/") != base_model.rstrip("/"):
            raise MergeInputError(
                f"model '{model}': its base '{base}' differs from base_model '{base_model}'"
            )
        model = adapter
    path = Path(model)
    return path if path.is_absolute() else root / path


def run_recipe(
    path: str | Path,
    out: str | Path,
    *,
    root: str | Path | None = None,
    force: bool = False,
    output: str | None = None,
    base: str | Path | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
    allow_base_mismatch: bool = False,
    allow_lineage_mismatch: bool = False,
) -> MergeResult:
    """Run a recipe natively (command-line ``output``/``base`` override the recipe's)."""
    path = Path(path)
    recipe = load_recipe(path)
    root = Path(root) if root is not None else Path.cwd()
    method = get_method(recipe.merge_method)
    params = recipe_params(recipe, method)
    opts = recipe.emomerge
    base_dir = base if base is not None else _local_base(recipe.base_model, root)
    dtype, out_dtype = dtypes(recipe)
    return merge(
        method.name,
        [adapter_path(m.model, recipe.base_model, root) for m in recipe.models],
        out,
        params=params,
        output=output or opts.output,
        base=base_dir,
        rank=opts.rank,
        max_error=opts.max_error,
        refactor=opts.refactor,
        seed=opts.seed,
        reference=opts.reference,
        layout=opts.layout,
        dtype=dtype,
        out_dtype=out_dtype,
        force=force,
        allow_pickle=allow_pickle,
        progress=progress,
        recipe=recipe.model_dump(mode="json", exclude_none=True),
        allow_base_mismatch=allow_base_mismatch,
        allow_lineage_mismatch=allow_lineage_mismatch,
        protect=[path],
    )


def _local_base(base_model: str | None, root: Path) -> Path | None:
    if base_model is None:
        return None
    candidate = Path(base_model) if Path(base_model).is_absolute() else root / base_model
    return candidate if candidate.is_dir() else None


def export_mergekit(
    recipe: Recipe, *, base_model: str, root: Path, reference_check: bool = True
) -> str:
    """The mergekit YAML of the same merge, with ``base+adapter`` model references.

    Refuses what mergekit cannot express: lineage chains whose task vectors are not a single
    adapter on the base (stacked stages, ``reference: previous``), methods or options it lacks.
    """
    method = get_method(recipe.merge_method)
    params = recipe_params(recipe, method)
    if Path(base_model).is_dir():
        # A local folder as an absolute path: mergekit runs from any folder, and it takes a
        # relative 'org/name'-shaped path for a hub id (its model card then queries the hub).
        base_model = str(Path(base_model).resolve())
    mk_method = method.mergekit
    if mk_method is None:
        raise MergeInputError(
            f"merge_method '{method.name}': mergekit has no equivalent; cannot export"
        )
    if recipe.parameters.get("paper"):
        raise MergeInputError(
            "parameters.paper: the paper-faithful TIES rule has no mergekit equivalent"
        )
    if recipe.parameters.get("space", "dense") != "dense":
        raise MergeInputError(
            f"parameters.space: mergekit merges dense weights only; space "
            f"'{recipe.parameters['space']}' cannot be exported"
        )
    if recipe.parameters.get("rescale") == "density":
        raise MergeInputError(
            "parameters.rescale: 'density' (DARE's 1/p) has no mergekit equivalent"
        )
    globals_ = {k: v for k, v in recipe.parameters.items() if k not in ("paper", "space")}
    adapters = [adapter_path(m.model, recipe.base_model, root) for m in recipe.models]
    if reference_check:
        tv = build_task_vectors(adapters, reference=recipe.emomerge.reference)
        for i, combo in enumerate(tv.combos):
            if list(combo.items()) != [(i, 1.0)]:
                raise MergeInputError(
                    f"{adapters[i]}: its task vector is not this one adapter on the base "
                    f"({'stacked lineage' if recipe.emomerge.reference == 'base' else 'reference previous'}); "
                    "mergekit's base+adapter cannot express it"
                )
    lines = [
        f"# mergekit recipe exported by emomerge from merge_method {method.name}.",
        "# Run: mergekit-yaml THIS.yaml OUT --lora-merge-cache CACHE_DIR",
        "# (base+adapter references need --lora-merge-cache: mergekit bakes each adapter into a",
        "#  full model copy there before merging.)",
    ]
    doc: dict[str, Any] = {"merge_method": mk_method, "base_model": base_model, "models": []}
    for i, adapter in enumerate(adapters):
        model_params = {}
        for p in method.params:
            if p.per_adapter and p.name in params and params[p.name][i] is not None:
                model_params[p.name] = params[p.name][i]
        if "weight" not in model_params:
            model_params["weight"] = 1.0
        doc["models"].append({"model": f"{base_model}+{adapter}", "parameters": model_params})
    shared = {
        k: v for k, v in globals_.items() if not (method.param(k) and method.param(k).per_adapter)
    }
    # Write every default explicitly: the file must mean the same whatever mergekit's defaults become.
    for p in method.params:
        if not p.per_adapter and p.name not in ("paper", "space") and p.name not in shared:
            shared[p.name] = p.default
    if shared:
        doc["parameters"] = shared
    # mergekit computes in ``dtype`` and stores ``out_dtype``: our compute dtype, and the stored
    # dtype we would write (for a local base without one named: its own, as our full output)
    compute, stored = dtypes(recipe)
    doc["dtype"] = compute
    stored = stored or _base_dtype(base_model)
    if stored is not None:
        doc["out_dtype"] = stored
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def _base_dtype(base_model: str) -> str | None:
    """The one floating dtype a local base checkpoint stores, or None (hub id, mixed dtypes)."""
    if not Path(base_model).is_dir():
        return None
    from .checkpoint import Checkpoint

    try:
        ckpt = Checkpoint(base_model)
        found = {ckpt.stored(key).dtype for file in ckpt.files() for key in ckpt.keys_in(file)}
    except MergeInputError:
        return None
    floats = found & set(_FLOAT_NAMES)
    return _FLOAT_NAMES[floats.pop()] if len(floats) == 1 else None


_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
