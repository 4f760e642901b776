"""Reading PEFT LoRA adapter folders into per-module low-rank factors.

A LoRA module contributes ΔW = s · B @ A to its base weight, with s = lora_alpha / r
(lora_alpha / √r under rsLoRA; per-module r and alpha from ``rank_pattern`` / ``alpha_pattern``),
transposed when the base layer stores its weight as ``[in, out]`` (``fan_in_fan_out``) and for
embeddings (PEFT computes ``(B @ A)ᵀ`` for ``lora_embedding_A/B``). We keep every update in the
*weight's own shape* as two factors ``L @ R`` with the scale folded into ``L``; nothing dense is
built here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import read_header, read_stored, stored_entry
from .errors import MergeInputError
from .lineage import StageMetadata, read_stage_metadata
from .names import detect_layout, strip_peft_prefix, to_canonical

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)
_REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters are not supported: their update is not B·A",
}
# Suffixes that name the same base model in another precision or packaging.
_QUANT_SUFFIX = re.compile(
    r"(-unsloth)?(-bnb)?-(4|8)bit$|-(awq|gptq|int4|int8|fp8|gguf|mlx)$", re.IGNORECASE
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-wrapped module of an adapter."""

    path: str  # canonical module path (no PEFT prefix, new layout)
    kind: str  # "linear" | "embedding"
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scale: float
    transpose: bool  # the weight-shaped update is (B @ A)ᵀ
    shape: tuple[int, int]  # shape of the base weight the update adds to


def base_identity(name_or_path: str | None) -> str | None:
    """A comparable identity of a base model name: last path part, lower case, no quant suffix.

    ``unsloth/Qwen2.5-VL-72B-Instruct-bnb-4bit`` and ``Qwen/Qwen2.5-VL-72B-Instruct`` (or a local
    folder of that name) are the same base: people train QLoRA on the 4-bit copy and merge into
    the full-precision weights.
    """
    if not name_or_path:
        return None
    name = name_or_path.rstrip("/\\").replace("\\", "/").split("/")[-1]
    return _QUANT_SUFFIX.sub("", name).lower() or None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): first key matching the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily tensor by tensor."""

    path: Path
    config: dict
    raw_paths: dict[str, str]  # canonical module path -> module path as stored (no PEFT prefix)
    modules: dict[str, LoraModule]
    saved: dict[str, str]  # canonical tensor name of a modules_to_save tensor -> stored key
    layout: str  # detect_layout() of the stored names ("plain" until resolved)
    weights_file: Path
    metadata: StageMetadata | None
    _pickled: dict[str, torch.Tensor] | None = None
    #: detect_layout() of the names as stored, kept after ``layout`` is resolved (base checks)
    stored_layout: str = "plain"
    _sha256: str | None = field(default=None, repr=False)
    _handle: object | None = field(default=None, repr=False)

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_name(self) -> str | None:
        if self.metadata is not None and self.metadata.base is not None:
            return self.metadata.base.name_or_path
        return self.config.get("base_model_name_or_path")

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_file)
        return self._sha256

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        if self._handle is None:  # the parsed header, kept for the whole merge
            self._handle = read_header(self.weights_file)
        data_start, header = self._handle
        return read_stored(stored_entry(self.weights_file, data_start, header, key))

    def factors(
        self, path: str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with L @ R the weight-shaped update of module ``path`` (scale in L)."""
        mod = self.modules[path]
        a = self.tensor(mod.key_a).to(dtype)
        b = self.tensor(mod.key_b).to(dtype)
        if mod.kind == "embedding":
            # PEFT: ΔW = (B @ A)ᵀ · s with A [r, num_embeddings], B [dim, r].
            return a.T * mod.scale, b.T
        if mod.transpose:
            return a.T * mod.scale, b.T
        return b * mod.scale, a

    def relayout(self, layout: str) -> None:
        """Re-derive canonical names once the meaning of a ``plain`` layout is decided."""
        if layout == self.layout:
            return
        self.modules = {
            to_canonical(raw, layout): _replace_path(self.modules[canon], to_canonical(raw, layout))
            for canon, raw in self.raw_paths.items()
        }
        self.raw_paths = {to_canonical(raw, layout): raw for raw in self.raw_paths.values()}
        self.saved = {
            to_canonical(strip_peft_prefix(key), layout): key for key in self.saved.values()
        }
        self.layout = layout


def _replace_path(mod: LoraModule, path: str) -> LoraModule:
    return LoraModule(**{**mod.__dict__, "path": path})


def _read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_FILE
    if not folder.exists():
        raise MergeInputError(f"{folder}: no such adapter folder")
    if not cfg_path.is_file():
        raise MergeInputError(f"{folder}: not a PEFT adapter folder ({CONFIG_FILE} is missing)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeInputError(f"{cfg_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(config, dict):
        raise MergeInputError(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeInputError(f"{cfg_path}: peft_type {peft_type} is not supported (LoRA only)")
    if config.get("use_dora"):
        raise MergeInputError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise MergeInputError(f"{cfg_path}: LoRA biases (lora_bias) are not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise MergeInputError(f"{cfg_path}: '{key}' must be a positive number, got {value!r}")
    return config


def _read_keys(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, tuple], dict | None]:
    """The weights file, ``{key: shape}`` and (for a pickle) the loaded tensors."""
    st_path = folder / WEIGHTS_FILE
    if st_path.is_file():
        try:
            with safe_open(st_path, framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MergeInputError(f"{st_path}: not a readable safetensors file ({msg})") from exc
        expected = _safetensors_data_end(st_path)
        if expected is not None and expected != st_path.stat().st_size:
            raise MergeInputError(
                f"{st_path}: truncated or corrupt (header describes {expected} bytes, "
                f"file has {st_path.stat().st_size})"
            )
        return st_path, shapes, None
    bin_path = folder / PICKLE_FILE
    if bin_path.is_file():
        if not allow_pickle:
            raise MergeInputError(
                f"{bin_path}: pickled weights can run code when loaded; convert to safetensors "
                "or pass --allow-pickle if you trust this file"
            )
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MergeInputError(f"{bin_path}: cannot be loaded ({exc})") from exc
        return bin_path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors
    raise MergeInputError(f"{folder}: no {WEIGHTS_FILE} (or {PICKLE_FILE}) in the adapter folder")


def _has_lora(shapes: dict, base_layer_key: str) -> bool:
    module = base_layer_key[: -len(".base_layer.weight")]
    return any(
        f"{module}.{which}" in shapes for which in ("lora_A.weight", "lora_embedding_A", "lora_A")
    )


def _safetensors_data_end(path: Path) -> int | None:
    """Total file size the header promises (8 + header + largest data offset)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end


def load_adapter(folder: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read an adapter's config and tensor index (no tensor data yet) and check consistency."""
    folder = Path(folder)
    config = _read_config(folder)
    weights_file, shapes, pickled = _read_keys(folder, allow_pickle)

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    rslora = bool(config.get("use_rslora"))

    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in shapes:
        for marker, why in _REFUSED_KEYS.items():
            if marker in key:
                raise MergeInputError(f"{weights_file}: tensor '{key}': {why}")
        match = _LORA_KEY.match(key)
        if match is None and key.endswith(".base_layer.weight") and _has_lora(shapes, key):
            # PEFT's default save_embedding_layers="auto" stores the frozen base weight of a LoRA'd
            # embed_tokens / lm_head beside its factors: a copy of the base, not an update.
            continue
        if match is None:
            if ".lora_" in key:
                raise MergeInputError(f"{weights_file}: tensor '{key}' is not a LoRA A/B factor")
            saved[strip_peft_prefix(key)] = key  # modules_to_save / trainable tokens: full tensors
            continue
        module = strip_peft_prefix(match["module"])
        pairs.setdefault(module, {})[match["which"]] = key

    layout = detect_layout(list(pairs) + list(saved))
    modules: dict[str, LoraModule] = {}
    for module, found in sorted(pairs.items()):
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if ka not in found or kb not in found:
            missing = ka if ka not in found else kb
            raise MergeInputError(f"{weights_file}: module '{module}' has no {missing} tensor")
        a_shape, b_shape = shapes[found[ka]], shapes[found[kb]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise MergeInputError(
                f"{weights_file}: module '{module}': factor shapes {a_shape} and {b_shape} do not "
                "form a LoRA pair (only linear and embedding LoRAs are supported)"
            )
        rank = a_shape[0]
        cfg_rank = int(_pattern_value(rank_pattern, module, config["r"]))
        if cfg_rank != rank:
            raise MergeInputError(
                f"{weights_file}: module '{module}' has rank {rank} but the config says {cfg_rank}"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        transpose = embedding or fan_in_fan_out
        # weight shape: linear [out, in] = B[out,r] @ A[r,in]; transposed kinds store [in, out].
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        modules[module] = LoraModule(
            path=module,
            kind="embedding" if embedding else "linear",
            key_a=found[ka],
            key_b=found[kb],
            rank=rank,
            alpha=alpha,
            scale=scale,
            transpose=transpose,
            shape=shape,
        )
    if not modules and not saved:
        raise MergeInputError(f"{weights_file}: holds no LoRA tensors")
    adapter = LoraAdapter(
        path=folder,
        config=config,
        raw_paths={m: m for m in modules},
        modules=modules,
        saved=saved,
        layout="plain",
        weights_file=weights_file,
        metadata=read_stage_metadata(folder),
        _pickled=pickled,
        stored_layout=layout,
    )
    adapter.relayout(layout)  # canonical names now; a "plain" layout is decided per merge
    return adapter


def check_finite(adapter: LoraAdapter) -> None:
    """Every factor and saved tensor is finite; the error names the first bad tensor."""
    keys = [k for m in adapter.modules.values() for k in (m.key_a, m.key_b)]
    keys += list(adapter.saved.values())
    for key in keys:
        t = adapter.tensor(key)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise MergeInputError(f"{adapter.weights_file}: tensor '{key}' contains {bad} values")
