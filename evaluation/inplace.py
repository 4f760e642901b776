"""Exact evaluation of any merge: its weights written into the loaded base, then taken out again.

The base is loaded once. For a variant that no adapter can represent exactly (a sparse merge, or
a ``--output full`` folder), every tensor the variant changes is replaced in place by the merged
tensor (``merging.updates``: recomputed from the merge's input adapters, or read from the full
folder), the variant is scored, and the original tensors are copied back from a CPU snapshot
taken just before — so the base is restored bit for bit (a test hashes it), not by subtracting
the update again (``(W + Δ) − Δ`` is not ``W`` in floating point).

Memory: one CPU copy of the tensors the variant changes (the language model's targeted
projections for a LoRA merge), held while the variant is scored. Low-rank variants (stages,
linear, task arithmetic, TSV, Iso, core space) keep using PEFT adapter switching, already exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from emomerge.merging.errors import InputError
from emomerge.merging.updates import FullWeights, StreamedMerge, Update, read_manifest

#: ``Variant.exact`` values: where a variant's exact weights come from.
STREAMED = "streamed"  # recomputed from the merge's input adapters
FULL = "full"  # read from a full checkpoint folder

_PEFT_ROOT = "base_model.model."


def canonical_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The base weights of a loaded model by canonical name (``model.language_model...``).

    Works on the bare model and on it wrapped by PEFT (``...q_proj.base_layer.weight``,
    ``...original_module.weight``); LoRA factors and PEFT's trainable copies are left out. Tied
    weights appear under each of their names (the same Parameter).
    """
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.removeprefix(_PEFT_ROOT)
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        out.setdefault(name, p)
    return out


def _check_plain(p: torch.nn.Parameter, name: str, what: str) -> None:
    if not p.dtype.is_floating_point or type(p).__name__ != "Parameter":
        raise InputError(
            f"{what}: the base's '{name}' is {type(p).__name__} ({p.dtype}); exact "
            "evaluation writes merged weights into the base, which needs it loaded "
            "unquantized"
        )


def check_full_folder(model: Any, folder: Path, base_fingerprint: str | None) -> None:
    """Refuse, before any scoring, a full folder that is not a complete model of this base.

    Checks: the manifest's base (when it recorded one) is the loaded base; every weight of the
    loaded model is stored (a tied weight under any of its names); every stored tensor is a
    weight or buffer of this model with the same shape.
    """
    weights = FullWeights(folder)
    manifest = read_manifest(folder)
    recorded = ((manifest or {}).get("base") or {}).get("fingerprint")
    if recorded and base_fingerprint and recorded != base_fingerprint:
        raise InputError(
            f"{folder}: merged into another base (its manifest's base fingerprint "
            f"{recorded[:12]} is not the loaded base's {base_fingerprint[:12]})"
        )
    params = canonical_parameters(model)
    buffers = {
        n.removeprefix(_PEFT_ROOT).replace(".base_layer.", ".") for n, _ in model.named_buffers()
    }
    stored = weights.names
    for name in stored:
        if name in params:
            if tuple(params[name].shape) != weights.shape(name):
                raise InputError(
                    f"{folder}: '{stored[name]}' is {list(weights.shape(name))} but "
                    f"the base's is {list(params[name].shape)} (another model?)"
                )
        elif name not in buffers:
            raise InputError(
                f"{folder}: '{stored[name]}' is not a tensor of the loaded base "
                "(another architecture?)"
            )
    by_param: dict[int, list[str]] = {}
    for name, p in params.items():
        by_param.setdefault(id(p), []).append(name)
    missing = [names[0] for names in by_param.values() if not any(n in stored for n in names)]
    if missing:
        raise InputError(
            f"{folder}: {len(missing)} of the base's tensors are missing (e.g. "
            f"'{missing[0]}'); not a complete checkpoint of this base"
        )
    for names in by_param.values():  # a tied weight stored twice must be stored alike
        kept = [n for n in names if n in stored]
        if len(kept) > 1 and not all(
            torch.equal(weights.tensor(kept[0]), weights.tensor(n)) for n in kept[1:]
        ):
            raise InputError(
                f"{folder}: stores '{kept[0]}' and '{kept[1]}' differently, which "
                "the loaded base ties (an untied head): load the folder as its "
                "own model instead"
            )


@contextlib.contextmanager
def written_into(
    model: Any, updates: Iterable[tuple[str, Update]], what: str, *, only_changed: bool = False
) -> Iterator[int]:
    """Replace the model's tensors by the updates' results; restore them on exit (bit for bit).

    Yields the number of tensors changed. ``only_changed``: keep tensors whose new value equals
    the current one untouched (a full folder stores every tensor; most are the base's own).
    """
    params = canonical_parameters(model)
    shared: dict[int, list[str]] = {}
    for name, p in params.items():
        shared.setdefault(id(p), []).append(name)
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, update in updates:
                p = params.get(name)
                if p is None:
                    raise InputError(
                        f"{what}: updates '{name}', which the loaded base does not "
                        "have (another model?)"
                    )
                _check_plain(p, name, what)
                new = update(p.data)
                if tuple(new.shape) != tuple(p.shape):
                    raise InputError(
                        f"{what}: '{name}' is {list(new.shape)} but the base's is "
                        f"{list(p.shape)} (another model?)"
                    )
                if only_changed and torch.equal(new, p.data):
                    continue
                if len(shared[id(p)]) > 1:
                    # a tied weight: changing it here would change every name it is tied to
                    raise InputError(
                        f"{what}: changes '{name}', which the loaded base ties to "
                        f"{[n for n in shared[id(p)] if n != name]}; exact "
                        "evaluation cannot untie it in place (evaluate the merge's "
                        "adapter, or load an untied base)"
                    )
                if id(p) not in saved:
                    saved[id(p)] = (p, p.data.to("cpu", copy=True))
                p.data.copy_(new)
        yield len(saved)
    finally:
        with torch.no_grad():
            for p, original in saved.values():
                p.data.copy_(original)


def _streamed(variant: Any, base_path: str | Path | None) -> StreamedMerge:
    from emomerge.merging.checkpoint import Checkpoint

    base = None
    if base_path is not None and (Path(base_path) / "config.json").is_file():
        base = Checkpoint(base_path)
    return StreamedMerge(Path(variant.path), read_manifest(variant.path) or {}, base)


def exact_updates(
    variant: Any, base_path: str | Path | None
) -> tuple[Iterable[tuple[str, Update]], bool]:
    """The variant's exact tensors and whether unchanged ones must be skipped (full folders)."""
    if variant.exact == FULL:
        return FullWeights(Path(variant.path)).updates(), True
    if variant.exact == STREAMED:
        return _streamed(variant, base_path).updates(), False
    raise ValueError(f"variant {variant.name}: no exact source ({variant.exact!r})")


@contextlib.contextmanager
def exact_variant(model: Any, variant: Any, base_path: str | Path | None) -> Iterator[int]:
    """``model`` holding ``variant``'s exact weights (PEFT adapters, if any, must be off)."""
    updates, only_changed = exact_updates(variant, base_path)
    if variant.exact == FULL:  # buffers a checkpoint stores (checked by shape) stay the model's
        params = canonical_parameters(model)
        updates = [(name, u) for name, u in updates if name in params]
    with written_into(model, updates, str(variant.path), only_changed=only_changed) as n:
        yield n


def check_against_base_folder(
    variants: Iterable[Any], base_path: str | Path, *, allow_base_mismatch: bool = False
) -> None:
    """The checks of :func:`check_exact` done on the base's files, before the base is loaded
    (minutes at 7B): a full folder stores exactly the base's tensors with their shapes and was
    merged into this base (``allow_base_mismatch`` skips only that last check); a streamed
    merge's inputs are present, unchanged and fit the base."""
    from emomerge.merging.checkpoint import Checkpoint

    base = Checkpoint(base_path)
    shapes = {name: tuple(base.shape(key)) for name, key in base.canonical.items()}
    fingerprint = None
    for v in variants:
        if v.exact == FULL:
            folder = Path(v.path)
            weights = FullWeights(folder)
            recorded = ((read_manifest(folder) or {}).get("base") or {}).get("fingerprint")
            if recorded and not allow_base_mismatch:
                fingerprint = fingerprint or base.fingerprint()
                if recorded != fingerprint:
                    raise InputError(
                        f"{folder}: merged into another base (its manifest's base "
                        f"fingerprint {recorded[:12]} is not {base_path}'s "
                        f"{fingerprint[:12]})"
                    )
            missing = [n for n in shapes if n not in weights.names]
            if missing:
                raise InputError(
                    f"{folder}: {len(missing)} of the base's tensors are missing "
                    f"(e.g. '{missing[0]}'); not a complete checkpoint of this base"
                )
            for name, key in weights.names.items():
                if name not in shapes:
                    raise InputError(
                        f"{folder}: '{key}' is not a tensor of the base {base_path} "
                        "(another architecture?)"
                    )
                if weights.shape(name) != shapes[name]:
                    raise InputError(
                        f"{folder}: '{key}' is {list(weights.shape(name))} but the "
                        f"base's is {list(shapes[name])} (another model?)"
                    )
        elif v.exact == STREAMED:
            for name, shape in _streamed(v, base_path).shapes().items():
                if shapes.get(name) != tuple(shape):
                    have = "does not have" if name not in shapes else f"has as {list(shapes[name])}"
                    raise InputError(
                        f"{v.path}: the merge updates '{name}' {list(shape)}, which "
                        f"the base {base_path} {have} (another base?)"
                    )


def check_exact(
    model: Any, variant: Any, base_path: str | Path | None, base_fingerprint: str | None
) -> None:
    """What can be checked before scoring: complete full folders of this base; a streamed
    merge's inputs present and unchanged, with shapes matching the base."""
    if variant.exact == FULL:
        check_full_folder(model, Path(variant.path), base_fingerprint)
    elif variant.exact == STREAMED:
        params = canonical_parameters(model)
        tied = _tied_names(params)
        for name, shape in _streamed(variant, base_path).shapes().items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(shape):
                have = "does not have" if p is None else f"has as {list(p.shape)}"
                raise InputError(
                    f"{variant.path}: the merge updates '{name}' {list(shape)}, "
                    f"which the loaded base {have} (another base?)"
                )
            if name in tied:
                raise InputError(
                    f"{variant.path}: the merge changes '{name}', which the loaded "
                    f"base ties to {tied[name]}; exact evaluation cannot untie it in "
                    "place (evaluate the merge's --output full folder with the "
                    "untied head as its own model, or --lowrank-merges)"
                )


def _tied_names(params: dict[str, torch.nn.Parameter]) -> dict[str, list[str]]:
    """name → the other names of the same Parameter, for tied weights only."""
    by_id: dict[int, list[str]] = {}
    for name, p in params.items():
        by_id.setdefault(id(p), []).append(name)
    return {
        n: [o for o in names if o != n] for names in by_id.values() if len(names) > 1 for n in names
    }
