"""A base model checkpoint on disk: config, safetensors shards and index, read tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .errors import MergeInputError
from .names import VLM_MODEL_TYPES, detect_layout, to_canonical

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Stored(NamedTuple):
    """Where a tensor's bytes sit in its safetensors file, as its header says."""

    file: Path
    offset: int  #: absolute byte offset in ``file``
    length: int
    dtype: str  #: safetensors dtype name (``F32``, ``BF16``, …)
    shape: tuple[int, ...]


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data buffer, parsed header without ``__metadata__``) of a safetensors
    file, checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 + n:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise MergeInputError(f"{path}: not a readable safetensors header ({exc})") from exc
    if 8 + n + end != size:
        raise MergeInputError(
            f"{path}: {size} bytes but its header indexes {8 + n + end} (truncated?)"
        )
    return 8 + n, header


def stored_entry(path: Path, data_start: int, header: dict, key: str) -> Stored:
    entry = header.get(key)
    if entry is None:
        raise MergeInputError(f"{path}: no tensor '{key}'")
    begin, end = entry["data_offsets"]
    return Stored(path, data_start + begin, end - begin, entry["dtype"], tuple(entry["shape"]))


def read_stored(stored: Stored, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor at ``stored``, read with ``pread`` into memory of its own (or into the start
    of ``buffer``, a uint8 tensor of at least ``stored.length`` bytes, reused across reads).

    Not through a memory map: every page read through a map counts in the process's RSS while
    the map is open (a handle kept per input would make the peak grow with the model's depth;
    one opened per tensor still doubles a large tensor's footprint while it is copied).
    """
    dtype = _TORCH_DTYPES.get(stored.dtype)
    if dtype is None:
        raise MergeInputError(f"{stored.file}: tensor dtype {stored.dtype} is not supported")
    count = 1
    for d in stored.shape:
        count *= d
    if count * dtype.itemsize != stored.length:
        raise MergeInputError(
            f"{stored.file}: a tensor of shape {list(stored.shape)} and dtype "
            f"{stored.dtype} cannot take {stored.length} bytes"
        )
    if buffer is not None and buffer.numel() >= stored.length:
        buf = buffer[: stored.length]
    else:
        buf = torch.empty(stored.length, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    with open(stored.file, "rb", buffering=0) as fh:
        while done < stored.length:
            n = os.preadv(fh.fileno(), [view[done:]], stored.offset + done)
            if n <= 0:
                raise MergeInputError(f"{stored.file}: ends inside a tensor (truncated?)")
            done += n
    return buf.view(dtype).reshape(stored.shape)


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
        self._headers: dict[str, tuple[int, dict]] = {}

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
            raise MergeInputError(
                f"{self.path}: only pickled .bin weights; save the base as safetensors"
            )
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

    def shape(self, key: str) -> tuple[int, ...]:
        return self.stored(key).shape

    def tensor(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """``key`` read into memory of its own or into ``buffer`` (``read_stored``: no memory map)."""
        return read_stored(self.stored(key), buffer)

    def stored(self, key: str) -> Stored:
        """The raw location of ``key``, so an unchanged tensor can be copied byte for byte."""
        file = self.weight_map[key]
        data_start, header = self._header(file)
        entry = header.get(key)
        if entry is None:
            raise MergeInputError(f"{self.path / INDEX_FILE}: '{key}' is not in shard '{file}'")
        begin, end = entry["data_offsets"]
        return Stored(
            self.path / file, data_start + begin, end - begin, entry["dtype"], tuple(entry["shape"])
        )

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = read_header(self.path / file)
        return self._headers[file]

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
