"""Writing merge outputs: atomic folders, PEFT adapters, sharded full checkpoints, manifests."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import Stored
from .errors import MergeInputError
from .names import PEFT_PREFIX, from_canonical, to_canonical

MANIFEST = "emomerge.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def peft_factors(
    left: torch.Tensor, right: torch.Tensor, *, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
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
        if (
            item.name in _SKIP_FILES
            or item.name.endswith(_WEIGHT_SUFFIXES)
            or item.name.startswith(".")
        ):
            continue
        if item.is_file():
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ITEMSIZE = {name: dtype.itemsize for dtype, name in _DTYPE_NAMES.items()}
_TORCH_OF = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_FLOATS = ("F64", "F32", "F16", "BF16")


def written_dtype(stored: str, out_dtype: torch.dtype | None) -> str:
    """The safetensors dtype a base tensor stored as ``stored`` is written in: ``out_dtype`` for
    floating tensors when one is asked (mergekit casts every tensor to its ``out_dtype``), else
    as stored. Integer and float8 tensors keep their dtype."""
    return _DTYPE_NAMES[out_dtype] if out_dtype is not None and stored in _FLOATS else stored


_U64_MAX = (1 << 64) - 1
_WIDEST_DTYPE = "X" * 16  # longer than any safetensors dtype name
_COPY_CHUNK = 8 << 20


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_DIRECT_IO = hasattr(os, "O_DIRECT")  # write data with O_DIRECT where the file system allows it
_ALIGN = 4096  # O_DIRECT offset, length and memory alignment
_BOUNCE = 16 << 20  # the page-aligned buffer data goes through


class _DirectData:
    """The data region of a file written with ``O_DIRECT`` through a page-aligned buffer.

    Written through the page cache, every output byte costs a fresh cache page and, past the
    dirty limit, waits for writeback: ~0.25–0.5 GB/s on these machines against ~1 GB/s for
    direct writes of the same bytes. Data starts at an aligned offset; the last block is
    padded and the file truncated to its exact size. A file system that refuses ``O_DIRECT``
    (tmpfs, some network mounts) gets ordinary writes of the same buffer."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, _BOUNCE)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.at = start  # file offset of the buffer's first byte (aligned)

    def write(self, data: memoryview) -> None:
        done, n = 0, len(data)
        while done < n:
            k = min(n - done, _BOUNCE - self.fill)
            self.view[self.fill : self.fill + k] = data[done : done + k]
            self.fill += k
            done += k
            if self.fill == _BOUNCE:
                self._flush(_BOUNCE)

    def copy_from(self, src: Stored) -> None:
        with open(src.file, "rb", buffering=0) as fh:
            done = 0
            while done < src.length:
                k = min(src.length - done, _BOUNCE - self.fill)
                got = os.preadv(
                    fh.fileno(), [self.view[self.fill : self.fill + k]], src.offset + done
                )
                if got <= 0:
                    raise MergeInputError(f"{src.file}: ends inside a tensor (truncated?)")
                self.fill += got
                done += got
                if self.fill == _BOUNCE:
                    self._flush(_BOUNCE)

    def _flush(self, length: int) -> None:
        written = 0
        while written < length:
            try:
                written += os.pwrite(self.fd, self.view[written:length], self.at + written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.fd)  # O_DIRECT refused on write: ordinary writes from here on
                self.fd = os.open(self.path, os.O_WRONLY)
        self.at += length
        self.fill = 0

    def finish(self, size: int) -> None:
        """Write what is buffered and cut the file to ``size`` bytes."""
        if self.fill:
            padded = -(-self.fill // _ALIGN) * _ALIGN
            self.view[self.fill : padded] = bytes(padded - self.fill)
            self._flush(padded)
        os.ftruncate(self.fd, size)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.view.release()
        self.buf.close()


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: each one's bytes go to disk as it arrives.

    Nothing is held but (dtype, shape, offsets) per tensor, so memory does not grow with the
    number of tensors. The header, written last, goes into space reserved at the start: its size
    is bounded from the names (and number of dimensions) announced up front, with the widest
    dtype name and 20-digit numbers, and the header is padded with spaces to exactly that size,
    a multiple of 8 so the data stays aligned (the format allows trailing spaces). If it still
    does not fit (a key not announced), the file is rewritten with a larger header.
    """

    def __init__(self, path: Path, ndims: dict[str, int], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = metadata
        bound = {"__metadata__": metadata} if metadata is not None else {}
        for key, ndim in ndims.items():
            bound[key] = {
                "dtype": _WIDEST_DTYPE,
                "shape": [_U64_MAX] * ndim,
                "data_offsets": [_U64_MAX] * 2,
            }
        # the data starts on a 4 KiB boundary (a multiple of 8, as the format wants; aligned
        # for direct writes)
        self.reserved = -(-(len(_json(bound)) + 8) // _ALIGN) * _ALIGN - 8
        self.entries: dict[str, dict] = {}
        self.end = 0  # data bytes written so far
        self.fh = open(self.path, "wb")
        self.fh.seek(8 + self.reserved)
        self.direct: _DirectData | None = None
        if _DIRECT_IO and os.environ.get("EMOMERGE_DIRECT_IO", "1") != "0":
            with contextlib.suppress(OSError):  # refused at open: ordinary writes
                self.direct = _DirectData(self.path, 8 + self.reserved)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's folder is discarded; just release the file
            if self.direct is not None:
                self.direct.close()
            self.fh.close()

    def _record(self, key: str, dtype: str, shape, length: int) -> None:
        if key in self.entries:
            raise ValueError(f"{self.path}: tensor '{key}' written twice")
        self.entries[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [self.end, self.end + length],
        }
        self.end += length

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the bytes ``save_file`` would store); no reference is kept."""
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{self.path}: cannot write '{key}' of dtype {tensor.dtype}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        length = flat.numel() * flat.element_size()
        if length and self.direct is not None:
            self.direct.write(memoryview(flat.view(torch.uint8).numpy()))
        elif length:
            self.fh.write(flat.view(torch.uint8).numpy())
        self._record(key, _DTYPE_NAMES[tensor.dtype], tensor.shape, length)

    def copy(self, key: str, src: Stored) -> None:
        """Append a tensor's bytes straight from another safetensors file (no tensor, no load).

        ``os.copy_file_range`` lets the kernel copy (or reflink); where it is missing or refuses
        (older kernels across file systems), the rest goes through a buffer of a few MB.
        """
        if self.direct is not None:
            self.direct.copy_from(src)
            self._record(key, src.dtype, src.shape, src.length)
            return
        self.fh.flush()
        at, done = 8 + self.reserved + self.end, 0
        with open(src.file, "rb") as fh:
            with contextlib.suppress(AttributeError, OSError):
                while done < src.length:
                    n = os.copy_file_range(
                        fh.fileno(),
                        self.fh.fileno(),
                        src.length - done,
                        src.offset + done,
                        at + done,
                    )
                    if n == 0:
                        break
                    done += n
            fh.seek(src.offset + done)
            self.fh.seek(at + done)
            while done < src.length:
                chunk = fh.read(min(_COPY_CHUNK, src.length - done))
                if not chunk:
                    raise MergeInputError(f"{src.file}: ends inside tensor '{key}' (truncated?)")
                self.fh.write(chunk)
                done += len(chunk)
        self._record(key, src.dtype, src.shape, src.length)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.finish(8 + self.reserved + self.end)
            self.direct = None
        header = {"__metadata__": self.metadata} if self.metadata is not None else {}
        header.update(self.entries)
        text = _json(header)
        if len(text) <= self.reserved:
            self.fh.seek(0)
            self.fh.write(self.reserved.to_bytes(8, "little") + text.ljust(self.reserved, b" "))
            self.fh.close()
            return
        self.fh.close()
        size = -(-len(text) // 8) * 8
        moved = self.path.with_name(self.path.name + ".tmp")
        with open(moved, "wb") as out, open(self.path, "rb") as data:
            out.write(size.to_bytes(8, "little") + text.ljust(size, b" "))
            data.seek(8 + self.reserved)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        os.replace(moved, self.path)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    current = 0
    for key, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(key)
        current += size
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def output_layout(tv, layout: str | None) -> str:
    """The adapter output's key layout: as asked, else the inputs' own, ``new`` when mixed."""
    if layout is not None:
        return layout
    found = {a.layout for a in tv.pool}
    return found.pop() if len(found) == 1 else "new"


def write_adapter_output(tmp, merger, tv, saved, ckpt, layout, bar, task):
    """PEFT ``adapter_model.safetensors``: each module's factors go to disk as they are made."""
    out_layout = output_layout(tv, layout)
    specs = {path: tv.module_spec(path) for path in tv.modules}
    names = {path: from_canonical(path, out_layout) for path in [*tv.modules, *saved]}
    ndims = {key: 2 for path in tv.modules for key in adapter_keys(names[path], specs[path].kind)}
    base = {name: ckpt.stored(ckpt.canonical[name]) for name in saved}
    for name in saved:
        ndims["base_model.model." + names[name]] = len(base[name].shape)
    factor_dtype = merger.out_dtype or torch.float32
    # Wider dtypes first keeps every tensor's data aligned to its element size (the factors are
    # out_dtype or F32, as wide as any saved floating tensor written after them).
    saved = sorted(
        saved, key=lambda name: -_ITEMSIZE.get(written_dtype(base[name].dtype, merger.out_dtype), 1)
    )
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    saved_modules = []
    with SafetensorsWriter(tmp / "adapter_model.safetensors", ndims, {"format": "pt"}) as writer:
        for path, (left, right, err) in merger.factors_in_order(list(tv.modules)):
            bar.update(task, module=path)
            a, b = peft_factors(left, right, transpose=specs[path].transpose)
            key_a, key_b = adapter_keys(names[path], specs[path].kind)
            writer.add(key_a, a.to(factor_dtype))
            writer.add(key_b, b.to(factor_dtype))
            ranks[names[path]] = a.shape[0]
            if err is not None:
                errors[names[path]] = err
            bar.advance(task)
        for name in saved:
            bar.update(task, module=name)
            base_t = ckpt.tensor(ckpt.canonical[name])
            merged = (base_t.to(merger.dtype) + merger.saved_delta(name)).to(
                _TORCH_OF[written_dtype(base[name].dtype, merger.out_dtype)]
            )
            writer.add("base_model.model." + names[name], merged)
            saved_modules.append(names[name].rsplit(".", 1)[0].rsplit(".", 1)[-1])
            bar.advance(task)
    template = dict(tv.inputs[0].config)
    template["base_model_name_or_path"] = tv.inputs[0].base_name
    write_json(tmp / "adapter_config.json", adapter_config(template, ranks, saved_modules))
    return errors, out_layout, ranks


class _Scratch:
    """Flat buffers reused from one tensor to the next (grown when too small): a fresh buffer
    for every module would fault in its pages anew (~1 s per GB on these machines)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")


def tied_head(ckpt, modules) -> tuple[str, str] | None:
    """``(lm_head key to write, embedding key it is tied to)`` when the base ties its output
    head to the input embedding (no ``lm_head`` weight stored) and the merge updates either.

    Folding into the shared weight would change both (what PEFT's merge does); the adapted
    model computes embeddings with W + ΔW_embed and logits with W + ΔW_head, so the output
    unties them: ``lm_head`` is written as a tensor of its own and the config says
    ``tie_word_embeddings: false``.
    """
    if "lm_head.weight" in ckpt.canonical:
        return None
    embed = next((name for name in _EMBEDDINGS if name in ckpt.canonical), None)
    if embed is None or not ({"lm_head", embed[: -len(".weight")]} & set(modules)):
        return None
    return from_canonical("lm_head.weight", ckpt.layout), ckpt.canonical[embed]


def untie_config(folder: Path) -> None:
    """``tie_word_embeddings: false`` in the written config (top level and text_config)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    write_json(path, config)


def write_full_output(tmp, merger, tv, saved, ckpt, max_shard_size, bar, task):
    """The base with the merged updates folded in, sharded like ``save_pretrained``.

    Every key's size comes from the base headers, so the shards are planned before anything is
    written. Merged tensors are computed and streamed; all others are copied as raw bytes. A
    tied output head is untied (``tied_head``). Returns whether it was.
    """
    modules = set(tv.modules)
    saved_set = set(saved)
    stored = {key: ckpt.stored(key) for file in ckpt.files() for key in ckpt.keys_in(file)}
    source = {key: key for key in stored}  # output key → the base tensor it starts from
    tied = tied_head(ckpt, modules)
    if tied is not None:
        source[tied[0]] = tied[1]
        stored[tied[0]] = stored[tied[1]]
    # what each key is written as: out_dtype for floating tensors when asked, else as stored
    target = {key: written_dtype(s.dtype, merger.out_dtype) for key, s in stored.items()}
    sizes = {
        key: s.length if target[key] == s.dtype else math.prod(s.shape) * _ITEMSIZE[target[key]]
        for key, s in stored.items()
    }
    scratch = _Scratch()
    shards = plan_shards(sizes, max_shard_size)
    files = shard_names(len(shards))
    for file, keys in zip(files, shards):
        ndims = {key: len(stored[key].shape) for key in keys}
        with SafetensorsWriter(tmp / file, ndims, {"format": "pt"}) as writer:
            # Wider dtypes first keeps every tensor's data aligned to its element size.
            for key in sorted(keys, key=lambda k: -_ITEMSIZE.get(target[k], 1)):
                canon = to_canonical(key, ckpt.layout)
                path = canon[: -len(".weight")] if canon.endswith(".weight") else None
                if path in modules:
                    bar.update(task, module=path)
                    # W + ΔW as (ΔW += W): the same sum, in two buffers reused for every module
                    base = ckpt.tensor(
                        source[key], scratch.get("base", stored[key].length, torch.uint8)
                    )
                    delta = merger.dense(
                        path, out=scratch.get("delta", base.numel(), merger.dtype).view(base.shape)
                    )
                    tensor = delta.add_(base).to(_TORCH_OF[target[key]])
                    bar.advance(task)
                elif canon in saved_set:
                    bar.update(task, module=canon)
                    tensor = ckpt.tensor(key)
                    tensor = (tensor.to(merger.dtype) + merger.saved_delta(canon)).to(
                        _TORCH_OF[target[key]]
                    )
                    bar.advance(task)
                elif (
                    target[key] != stored[key].dtype
                ):  # untouched, cast as mergekit's out_dtype does
                    tensor = ckpt.tensor(source[key]).to(_TORCH_OF[target[key]])
                else:
                    writer.copy(key, stored[key])
                    continue
                writer.add(key, tensor)
    if len(shards) > 1:
        write_json(
            tmp / "model.safetensors.index.json",
            {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {key: file for file, keys in zip(files, shards) for key in keys},
            },
        )
    copy_side_files(ckpt.path, tmp)
    if tied is not None:
        untie_config(tmp)
    if merger.out_dtype is not None and (tmp / "config.json").is_file():
        restate_dtype(tmp, str(merger.out_dtype).removeprefix("torch."))
    return tied is not None


def restate_dtype(folder: Path, name: str) -> None:
    """The config's dtype says what the weights are stored in (as mergekit's out_dtype does)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = name
    write_json(path, config)
