"""Writing merge outputs: atomic folders, PEFT adapters, sharded full checkpoints, manifests."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import MergeInputError
from .names import PEFT_PREFIX, from_canonical, to_canonical

MANIFEST = "emomerge.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST}


@contextlib.contextmanager
def atomic_folder(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it into place only on success.

    A failure (or Ctrl-C) removes the temporary folder, so nothing half-written is left. An
    existing ``out`` is refused unless ``force``, and then replaced only once the new one is whole.
    """
    out = Path(out)
    if out.exists() and not force:
        raise MergeInputError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def peft_factors(left: torch.Tensor, right: torch.Tensor, *, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) from weight-shaped factors: L R = B A, or (B A)ᵀ for transposed kinds."""
    if transpose:
        return left.T.contiguous(), right.T.contiguous()
    return right.contiguous(), left.contiguous()


def adapter_keys(path: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"{PEFT_PREFIX}{path}.lora_embedding_A", f"{PEFT_PREFIX}{path}.lora_embedding_B"
    return f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"


def adapter_config(template: dict, ranks: dict[str, int], saved: list[str]) -> dict:
    """A LoRA config whose scale is 1 for every module (the scale is folded into B).

    ``r`` is the most common rank; other modules get ``rank_pattern`` and ``alpha_pattern``
    entries (full module names, which PEFT matches against the end of each module name).
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    common = max(counts, key=lambda r: (counts[r], r)) if counts else 1
    config = {k: v for k, v in template.items() if k not in ("revision",)}
    config.update(
        {
            "peft_type": "LORA",
            "r": common,
            "lora_alpha": common,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {m: r for m, r in ranks.items() if r != common},
            "alpha_pattern": {m: r for m, r in ranks.items() if r != common},
            "target_modules": sorted(ranks),
            "modules_to_save": sorted(saved) or None,
            "lora_dropout": 0.0,
            "inference_mode": True,
        }
    )
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        config[key] = None
    return config


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Copy config, tokenizer, processor and template files of the base (not its weights)."""
    copied = []
    for item in sorted(base.iterdir()):
        if item.name in _SKIP_FILES or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied


class ShardWriter:
    """Write tensors into safetensors shards of bounded size, then the index."""

    def __init__(self, out: Path, max_shard_bytes: int):
        self.out = out
        self.max = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._files: list[list[str]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max:
            self._flush()
        self.current[key] = tensor.contiguous()
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        index = len(self._files) + 1
        tmp_name = f"shard-{index:05d}.safetensors"
        save_file(self.current, str(self.out / tmp_name), metadata={"format": "pt"})
        self._files.append([tmp_name, *self.current.keys()])
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[str]:
        if self.current or not self._files:
            self._flush()
        n = len(self._files)
        names = []
        for i, (tmp_name, *keys) in enumerate(self._files, start=1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.out / tmp_name).rename(self.out / name)
            names.append(name)
            for key in keys:
                self.weight_map[key] = name
        if n > 1:
            write_json(
                self.out / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
            )
        return names


def output_layout(tv, layout: str | None) -> str:
    """The adapter output's key layout: as asked, else the inputs' own, ``new`` when mixed."""
    if layout is not None:
        return layout
    found = {a.layout for a in tv.pool}
    return found.pop() if len(found) == 1 else "new"


def write_adapter_output(tmp, merger, tv, saved, ckpt, layout, bar, task):
    out_layout = output_layout(tv, layout)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for path in tv.modules:
        bar.update(task, module=path)
        left, right, err = merger.factors(path)
        spec = tv.module_spec(path)
        a, b = peft_factors(left, right, transpose=spec.transpose)
        name = from_canonical(path, out_layout)
        key_a, key_b = adapter_keys(name, spec.kind)
        tensors[key_a], tensors[key_b] = a.float(), b.float()
        ranks[name] = a.shape[0]
        if err is not None:
            errors[name] = err
        bar.advance(task)
    saved_modules = []
    for name in saved:
        bar.update(task, module=name)
        base_t = ckpt.tensor(ckpt.canonical[name])
        merged = (base_t.to(merger.dtype) + merger.saved_delta(name)).to(base_t.dtype)
        out_name = from_canonical(name, out_layout)
        tensors["base_model.model." + out_name] = merged.contiguous()
        saved_modules.append(out_name.rsplit(".", 1)[0].rsplit(".", 1)[-1])
        bar.advance(task)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    template = dict(tv.inputs[0].config)
    template["base_model_name_or_path"] = tv.inputs[0].base_name
    write_json(tmp / "adapter_config.json", adapter_config(template, ranks, saved_modules))
    return errors, out_layout, ranks


def write_full_output(tmp, merger, tv, saved, ckpt, max_shard_size, bar, task):
    modules = set(tv.modules)
    saved_set = set(saved)
    writer = ShardWriter(tmp, max_shard_size)
    for file in ckpt.files():
        for key in ckpt.keys_in(file):
            tensor = ckpt.tensor(key)
            canon = to_canonical(key, ckpt.layout)
            path = canon[: -len(".weight")] if canon.endswith(".weight") else None
            if path in modules:
                bar.update(task, module=path)
                tensor = (tensor.to(merger.dtype) + merger.dense(path)).to(tensor.dtype)
                bar.advance(task)
            elif canon in saved_set:
                bar.update(task, module=canon)
                tensor = (tensor.to(merger.dtype) + merger.saved_delta(canon)).to(tensor.dtype)
                bar.advance(task)
            writer.add(key, tensor)
    writer.close()
    copy_side_files(ckpt.path, tmp)
