"""Leave-one-stage-out: rebuild a merge without each of its input stages in turn.

For a merged variant whose manifest lists stages s_1..s_n, the ablation merges the other n − 1
with the same method, the same given parameters (per-adapter lists lose the dropped entry) and the
same seed, through ``emomerge.merging.merge``. Scoring these next to the full merge shows what
each stage contributes. Outputs are reused when their manifest names the same inputs (same
sha256), since a real-size merge takes minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emomerge.merging.config import load_json
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import LINEAGE_FILE

from .variants import Variant, variant_from_dir


def _manifest(path: Path) -> dict[str, Any]:
    f = path / LINEAGE_FILE
    raw = load_json(f, what="merge manifest")  # DESIGN.md, Configuration
    if raw.get("kind") != "merge":
        raise InputError(f"{f}: key 'kind': not a merge manifest")
    return raw


def _drop(params: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    # per-adapter parameter lists (weights, densities) lose the dropped adapter's entry
    return {
        k: [x for j, x in enumerate(v) if j != i] if isinstance(v, list) and len(v) == n else v
        for k, v in params.items()
    }


def _weights_sha256(adapter: Path) -> str:
    # what the merge manifest records per input: the sha256 of the adapter's weights file
    from emomerge.merging.adapters import sha256_file

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return sha256_file(adapter / name)
    return ""


def _recipe_of(manifest: dict[str, Any]) -> tuple:
    # what makes two merges the same: inputs (sha256), method, given parameters, seed, reference,
    # rank and the rest of the re-factorisation and precision settings
    return (
        [str(a.get("sha256")) for a in manifest.get("adapters", [])],
        manifest.get("method"),
        manifest.get("params_given"),
        manifest.get("seed"),
        manifest.get("reference"),
        manifest.get("rank"),
        manifest.get("max_error"),
        manifest.get("refactor_choice", "projection"),
        manifest.get("dtype", "float32"),
        manifest.get("out_dtype"),
        bool(manifest.get("allow_lineage_mismatch")),
    )


def _inputs(merged: Variant) -> tuple[dict[str, Any], list[Path], list[str]]:
    if merged.kind != "merged" or merged.path is None:
        raise InputError(f"{merged.name}: leave-one-stage-out needs a merged variant")
    raw = _manifest(merged.path)
    inputs = [Path(a["path"] if isinstance(a, dict) else a) for a in raw["adapters"]]
    names = [
        (a.get("stage") if isinstance(a, dict) else None) or p.name
        for a, p in zip(raw["adapters"], inputs)
    ]
    return raw, inputs, names


def ablation_names(merged: Variant) -> list[str]:
    """The variant names :func:`leave_one_stage_out` gives, read from the manifest, nothing built."""
    _, inputs, names = _inputs(merged)
    return [f"{merged.name}-without-{d}" for d in names] if len(inputs) >= 2 else []


def leave_one_stage_out(
    merged: Variant, out_root: str | Path, *, exact: bool = True
) -> list[Variant]:
    """The merges of ``merged``'s inputs without one stage each, as variants (built if needed;
    ``exact``: see :func:`variants.variant_from_dir`)."""
    from emomerge.merging import merge

    raw, inputs, names = _inputs(merged)
    for p in inputs:
        if not p.is_dir():
            raise InputError(f"{merged.path / LINEAGE_FILE}: key 'adapters': {p} no longer exists")
    if len(inputs) < 2:
        return []
    params = dict(raw.get("params_given") or {})
    variants = []
    for i, dropped in enumerate(names):
        keep = [p for j, p in enumerate(inputs) if j != i]
        out = Path(out_root) / f"{merged.name.replace('/', '_')}-without-{dropped}"
        kept_params = _drop(params, i, len(inputs))
        seed, reference = int(raw.get("seed") or 0), raw.get("reference") or "base"
        rank = (
            raw.get("rank")
            if isinstance(raw.get("rank"), int) or raw.get("rank") == "auto"
            else None
        )
        max_error = raw.get("max_error") if rank == "auto" else None
        # the rest of the merge's own recipe, so the ablation differs from it by the stage only
        refactor = raw.get("refactor_choice") or "projection"
        dtype, out_dtype = raw.get("dtype") or "float32", raw.get("out_dtype")
        lineage_mismatch = bool(raw.get("allow_lineage_mismatch"))
        expected = (
            [_weights_sha256(p) for p in keep],
            raw["method"],
            kept_params,
            seed,
            reference,
            rank,
            max_error,
            refactor,
            dtype,
            out_dtype,
            lineage_mismatch,
        )
        reuse = out.is_dir() and (out / LINEAGE_FILE).is_file()
        if reuse:
            try:
                reuse = _recipe_of(_manifest(out)) == expected
            except InputError:
                reuse = False
        if not reuse:
            # --force replaces an earlier ablation only; different bases stay what the merge
            # itself allowed (DESIGN.md, Outputs)
            merge(
                raw["method"],
                keep,
                out,
                params=kept_params,
                seed=seed,
                reference=reference,
                rank=rank,
                max_error=max_error,
                refactor=refactor,
                dtype=dtype,
                out_dtype=out_dtype,
                force=True,
                allow_base_mismatch=bool(raw.get("allow_base_mismatch")),
                allow_lineage_mismatch=lineage_mismatch,
            )
        v = variant_from_dir(out, name=f"{merged.name}-without-{dropped}", exact=exact)
        variants.append(v)
    return variants
