"""A base model checkpoint on disk: config, safetensors shards and index, read tensor by tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MergeInputError
from .names import VLM_MODEL_TYPES, detect_layout, to_canonical

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """The base model folder a full-output merge folds into."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise MergeInputError(f"{self.path}: base model folder not found")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MergeInputError(f"{self.path}: no config.json in the base model folder")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise MergeInputError(f"{cfg}: not valid JSON ({exc.msg})") from exc
        self.weight_map = self._weight_map()
        self.layout = self._layout()
        #: canonical tensor name -> stored key
        self.canonical = {to_canonical(k, self.layout): k for k in self.weight_map}
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MergeInputError(f"{index}: not a safetensors index ({exc})") from exc
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise MergeInputError(f"{index}: shard '{file}' is missing")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            try:
                with safe_open(single, framework="pt") as fh:
                    return {k: SINGLE_FILE for k in fh.keys()}
            except Exception as exc:
                raise MergeInputError(f"{single}: not a readable safetensors file ({exc})") from exc
        if any(self.path.glob("*.bin")):
            raise MergeInputError(f"{self.path}: only pickled .bin weights; save the base as safetensors")
        raise MergeInputError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def vlm_flavour(self) -> str | None:
        """The legacy layout of this VLM family, or None for a text model."""
        return VLM_MODEL_TYPES.get(self.model_type or "")

    def _layout(self) -> str:
        found = detect_layout(self.weight_map)
        if found == "plain":
            return "qwen-legacy" if self.vlm_flavour == "qwen-legacy" else "text"
        return found

    def files(self) -> list[str]:
        """Shard files in the order their tensors should be processed."""
        seen: dict[str, None] = {}
        for file in self.weight_map.values():
            seen.setdefault(file, None)
        return list(seen)

    def keys_in(self, file: str) -> list[str]:
        return [k for k, f in self.weight_map.items() if f == file]

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[key]).get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle(self.weight_map[key]).get_tensor(key)

    def fingerprint(self) -> str:
        """A cheap, content-bound identity of the model folder (training, merging and evaluation
        all key on it).

        sha256 over config.json, the tokenizer / processor / chat-template files, and per weight
        file its size, its safetensors header (names, dtypes, shapes) and three 1 MiB samples of
        its data (start, middle, end), so retrained weights of the same shapes change it without
        reading gigabytes.
        """
        digest = hashlib.sha256()
        for item in sorted(self.path.iterdir()):
            if item.is_file() and item.suffix in (".json", ".jinja", ".txt", ".model", ".tiktoken"):
                if item.name.endswith(".index.json"):
                    continue
                digest.update(item.name.encode() + b"\0" + item.read_bytes())
        for file in sorted(set(self.weight_map.values())):
            path = self.path / file
            size = path.stat().st_size
            digest.update(f"{file}:{size}".encode())
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(header_len))
                for offset in (0, size // 2, max(0, size - (1 << 20))):
                    fh.seek(offset)
                    digest.update(fh.read(1 << 20))
        return digest.hexdigest()
