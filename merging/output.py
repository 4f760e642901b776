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
from .names import PEFT_PREFIX

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
