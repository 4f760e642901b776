"""Exact merged weights, tensor by tensor, for evaluating a merge without a copy of the model.

A sparse merge (TIES, DARE, Breadcrumbs, DELLA) is a sparse, high-rank update; written as an
adapter (``--output adapter``) it is re-factorised to a rank and is no longer the merge its name
says. Evaluation therefore scores such a merge from one of two exact sources, both yielding the
*merged weight* of every tensor the merge changes, as ``(canonical name, function of the base
tensor)``:

- :class:`StreamedMerge` — recomputed from the merge's own input adapters with the very code that
  writes ``--output full`` (``engine._Merger.dense``): ``(ΔW + W)`` summed in the merge dtype and
  cast to the base tensor's dtype, so the result equals the full-output folder bit for bit;
- :class:`FullWeights` — read from a ``--output full`` folder (or any checkpoint of the same
  architecture): the stored tensor, cast to the base tensor's dtype.

Names are canonical (``names.to_canonical``), which is the in-memory parameter naming of
transformers ≥ 4.52, so the caller maps them onto a loaded model directly. Nothing here imports
transformers: a caller hands in the base tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import sha256_file
from .checkpoint import Checkpoint
from .config import load_json
from .errors import MergeInputError
from .names import to_canonical
from .output import MANIFEST

#: A merged tensor from its base tensor (same shape; the base tensor's dtype).
Update = Callable[[torch.Tensor], torch.Tensor]

#: Bumped when a change of the merge code changes merged weights: evaluation keys exact merges'
#: cached predictions on it (evaluation/variants.py).
MERGE_SEMANTICS = 1


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``emomerge.json`` of a merge output folder, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return load_json(path, what="manifest")  # DESIGN.md, Configuration


def is_full_folder(folder: str | Path) -> bool:
    """A model folder with safetensors weights (``config.json`` + weights or an index)."""
    p = Path(folder)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    )


def is_refactorised(manifest: dict[str, Any]) -> bool:
    """An adapter-output merge whose factors approximate the merge (any module's error > 0)."""
    if manifest.get("kind") != "merge" or manifest.get("output") != "adapter":
        return False
    errors = manifest.get("errors") or {}
    return float(errors.get("max") or 0.0) > 0.0


@dataclass
class StreamedMerge:
    """A merge recomputed from its manifest's input adapters, one module at a time.

    Refuses (one line) when an input adapter is gone or its weights changed since the merge (the
    sha256 the manifest recorded), since the result would silently be another merge.
    """

    folder: Path
    manifest: dict[str, Any]
    base: Checkpoint | None = None

    def __post_init__(self) -> None:
        from .engine import DTYPES, _Merger, absorb_saved_overlaps, get_method
        from .taskvectors import build_task_vectors

        m = self.manifest
        where = self.folder / MANIFEST
        for key in ("method", "adapters", "seed", "reference", "dtype"):
            if key not in m:
                raise MergeInputError(f"{where}: key '{key}' missing from the merge manifest")
        paths = []
        for i, a in enumerate(m["adapters"]):
            if not isinstance(a, dict) or "path" not in a or "sha256" not in a:
                raise MergeInputError(f"{where}: adapters[{i}] lacks its path or sha256")
            p = Path(a["path"])
            weights = p / "adapter_model.safetensors"
            if not weights.is_file():
                raise MergeInputError(
                    f"{where}: input adapter {p} is gone; the exact merge "
                    "needs its inputs (or evaluate an --output full folder)"
                )
            if sha256_file(weights) != a["sha256"]:
                raise MergeInputError(
                    f"{weights}: changed since the merge {self.folder} was "
                    "made (sha256 differs from its manifest)"
                )
            config = p / "adapter_config.json"
            if (
                a.get("config_sha256")
                and config.is_file()
                and hashlib.sha256(config.read_bytes()).hexdigest() != a["config_sha256"]
            ):
                raise MergeInputError(
                    f"{config}: changed since the merge {self.folder} was made "
                    "(its LoRA scale changes the merge)"
                )
            paths.append(p)
        method = get_method(str(m["method"]))
        params = dict(m.get("params_given") or {})
        if m["dtype"] not in DTYPES:
            raise MergeInputError(f"{where}: key 'dtype': unknown dtype {m['dtype']!r}")
        from .engine import OUT_DTYPES

        out_dtype = m.get("out_dtype")
        if out_dtype is not None and out_dtype not in OUT_DTYPES:
            raise MergeInputError(f"{where}: key 'out_dtype': unknown dtype {out_dtype!r}")
        tv = build_task_vectors(
            paths,
            reference=str(m["reference"]),
            base_flavour=self.base.vlm_flavour if self.base else None,
            allow_lineage_mismatch=bool(m.get("allow_lineage_mismatch")),
        )
        saved = sorted({name for a in tv.inputs for name in a.saved})
        if saved and self.base is None:
            raise MergeInputError(
                f"{where}: the merge has modules_to_save tensors; their exact "
                "update needs the base model folder"
            )
        absorb_saved_overlaps(tv, saved)  # as engine.merge: such a module is merged once
        names = {p: p + ".weight" for p in tv.modules} | {name: name for name in saved}
        self._saved = saved
        self._merger = _Merger(
            method,
            tv,
            params,
            seed=int(m["seed"]),
            dtype=DTYPES[m["dtype"]],
            rank=None,
            saved_base=self.base,
            names=names,
            out_dtype=OUT_DTYPES[out_dtype] if out_dtype else None,
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """canonical tensor name → shape, for every tensor the merge changes (``modules_to_save``
        tensors: the base's shape)."""
        out = {path + ".weight": tuple(shape) for path, shape in self._merger.tv.shapes.items()}
        for name in self._saved:
            assert self.base is not None
            out[name] = tuple(self.base.shape(self.base.canonical[name]))
        return out

    def updates(self) -> Iterator[tuple[str, Update]]:
        """``(canonical tensor name, base tensor → merged tensor)`` for every changed tensor."""
        merger = self._merger
        for path in merger.tv.modules:

            def fold(w: torch.Tensor, path: str = path) -> torch.Tensor:
                # as output.write_full_output: ΔW += W as stored on disk, in the merge dtype, then
                # the dtype the full output would store (out_dtype, else the stored one), then
                # the loaded dtype — bit for bit the full folder loaded the same way. Without the
                # base folder (a hub id), W is the loaded tensor.
                delta = merger.dense(path).to(w.device)
                if self.base is None or path + ".weight" not in self.base.canonical:
                    return delta.add_(w).to(merger.out_dtype or w.dtype).to(w.dtype)
                stored = self.base.tensor(self.base.canonical[path + ".weight"])
                return (
                    delta.add_(stored.to(w.device)).to(merger.out_dtype or stored.dtype).to(w.dtype)
                )

            yield path + ".weight", fold
        for name in self._saved:

            def fold_saved(w: torch.Tensor, name: str = name) -> torch.Tensor:
                delta = merger.saved_delta(name).to(w.device)
                return (w.to(merger.dtype) + delta).to(w.dtype)

            yield name, fold_saved


@dataclass
class FullWeights:
    """The tensors of a full checkpoint folder, by canonical name."""

    folder: Path

    def __post_init__(self) -> None:
        self.ckpt = Checkpoint(self.folder)

    @property
    def names(self) -> dict[str, str]:
        """canonical name → stored key."""
        return self.ckpt.canonical

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.shape(self.names[name]))

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(self.names[name])

    def updates(self) -> Iterator[tuple[str, Update]]:
        """``(canonical name, base tensor → stored tensor)`` for every stored tensor."""
        for name in self.names:

            def stored(w: torch.Tensor, name: str = name) -> torch.Tensor:
                return self.tensor(name).to(device=w.device, dtype=w.dtype)

            yield name, stored


def canonical_of(key: str, layout: str) -> str:
    """A stored key's canonical name (re-exported for callers mapping model parameters)."""
    return to_canonical(key, layout)
