"""Random PEFT LoRA adapters written the way PEFT writes them, and the dense ΔW they mean.

The dense reference here is written from PEFT's definition (ΔW = s·B@A, s = α/r or α/√r,
transposed for fan_in_fan_out and embeddings), independently of emomerge's reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_adapter(
    folder: Path,
    modules: dict[str, tuple[int, int]],
    *,
    r: int = 4,
    alpha: float = 8,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    embeddings: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
    base: str = "tiny/base-model",
    scale: float = 0.1,
    lineage: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Write an adapter; return {module: dense weight-shaped ΔW (float64)}.

    ``modules``: module path (in-memory name, no PEFT prefix) -> weight shape ``[out, in]``
    (``[in, out]`` storage when fan_in_fan_out). ``embeddings``: path -> ``[num, dim]``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rank_pattern = rank_pattern or {}
    alpha_pattern = alpha_pattern or {}
    tensors, dense = {}, {}

    def pick(patterns, name, default):
        for key, value in patterns.items():
            if name.endswith(key):
                return value
        return default

    for path, shape in modules.items():
        rank = pick(rank_pattern, path, r)
        a_alpha = pick(alpha_pattern, path, alpha)
        s = a_alpha / math.sqrt(rank) if rslora else a_alpha / rank
        out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
        A = torch.randn(rank, in_f, generator=g) * scale
        B = torch.randn(out_f, rank, generator=g) * scale
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B
        delta = s * (B.double() @ A.double())
        dense[path] = delta.T if fan_in_fan_out else delta
    for path, (num, dim) in (embeddings or {}).items():
        rank = pick(rank_pattern, path, r)
        s = pick(alpha_pattern, path, alpha) / (math.sqrt(rank) if rslora else rank)
        A = torch.randn(rank, num, generator=g) * scale
        B = torch.randn(dim, rank, generator=g) * scale
        tensors[f"{PREFIX}{path}.lora_embedding_A"] = A
        tensors[f"{PREFIX}{path}.lora_embedding_B"] = B
        dense[path] = (s * (B.double() @ A.double())).T
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    targets = sorted({p.rsplit(".", 1)[-1] for p in list(modules) + list(embeddings or {})})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if lineage is not None:
        (folder / "emomerge.json").write_text(
            json.dumps({"kind": "stage_adapter", "lineage": lineage})
        )
    return dense


def lm_modules(
    layers: int = 2, hidden: int = 16, inter: int = 24, prefix: str = "model.layers"
) -> dict:
    shapes = {}
    for i in range(layers):
        shapes[f"{prefix}.{i}.self_attn.q_proj"] = (hidden, hidden)
        shapes[f"{prefix}.{i}.self_attn.v_proj"] = (hidden // 2, hidden)
        shapes[f"{prefix}.{i}.mlp.down_proj"] = (hidden, inter)
    return shapes


def write_base(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    model_type: str = "llama",
    seed: int = 123,
    extra: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """A base checkpoint folder: ``{path}.weight`` tensors for each module (+ extra tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{p}.weight": torch.randn(*s, generator=g) for p, s in shapes.items()}
    for key, s in (extra or {}).items():
        tensors[key] = torch.randn(*s, generator=g)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "tokenizer_config.json").write_text("{}")
    return tensors
