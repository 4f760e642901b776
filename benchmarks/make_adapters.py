"""Random LoRA adapters (PEFT format) with a real architecture's module names and shapes.

Usage:
    python benchmarks/make_adapters.py --preset qwen2.5-vl-7b --count 4 --rank 16 --layers 28 --out /tmp/bench
    python benchmarks/make_adapters.py --config ../shared/data/real_adapters/qwen2.5-vl-32b-base/config.json ...
    python benchmarks/make_adapters.py --preset qwen2.5-vl-7b --layers 2 --base --vocab 32000 --out /tmp/bench

Writes OUT/adapter_{i}/ (adapter_config.json + adapter_model.safetensors) and, with --base,
OUT/base/ — a random text model of the same widths (a Qwen2/Llama causal LM that mergekit and
transformers read) so full-output merges can be compared at a depth that fits this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# Language-model widths of the presets (config.json values; the 7B config is not in ../shared).
PRESETS = {
    "qwen2.5-vl-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        base_name="Qwen/Qwen2.5-VL-7B-Instruct",
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=24,
        vocab_size=151936,
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        base_name="Qwen/Qwen2.5-0.5B-Instruct",
    ),
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_adapters"
CONFIG_PRESETS = {
    "qwen2.5-vl-32b": SHARED / "qwen2.5-vl-32b-base" / "config.json",
    "llama-3.2-11b-vision": SHARED / "llama-3.2-11b-vision-base" / "config.json",
}


def dims_from_config(path: Path) -> dict:
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config", cfg)
    dims = {
        k: text[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_hidden_layers",
            "vocab_size",
        )
    }
    dims["cross_attention_layers"] = text.get("cross_attention_layers", [])
    dims["model_type"] = "llama"
    dims["architectures"] = ["LlamaForCausalLM"]
    dims["base_name"] = path.parent.name
    return dims


def module_shapes(d: dict, layers: int) -> dict[str, tuple[int, int]]:
    """``model.layers.N.<module>`` -> weight shape ``[out, in]`` of every LoRA target."""
    h, inter = d["hidden_size"], d["intermediate_size"]
    head = h // d["num_attention_heads"]
    kv = head * d["num_key_value_heads"]
    shapes = {}
    for i in range(layers):
        attn = "cross_attn" if i in d.get("cross_attention_layers", []) else "self_attn"
        out_in = {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (inter, h),
            "up_proj": (inter, h),
            "down_proj": (h, inter),
        }
        for m in MODULES:
            group = "mlp" if m.endswith(("gate_proj", "up_proj", "down_proj")) else attn
            shapes[f"model.layers.{i}.{group}.{m}"] = out_in[m]
    return shapes


def write_adapters(
    out: Path, dims: dict, *, count: int, rank: int, layers: int, seed: int = 0
) -> list[Path]:
    shapes = module_shapes(dims, layers)
    folders = []
    for a in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + a)
        tensors = {}
        for path, (o, i) in shapes.items():
            # Kaiming-like A and a trained-looking B, bf16 as PEFT saves after bf16 training.
            tensors[f"base_model.model.{path}.lora_A.weight"] = (
                torch.randn(rank, i, generator=g) / i**0.5
            ).to(torch.bfloat16)
            tensors[f"base_model.model.{path}.lora_B.weight"] = (
                torch.randn(o, rank, generator=g) * 1e-3
            ).to(torch.bfloat16)
        folder = out / f"adapter_{a}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": dims["base_name"],
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": list(MODULES),
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "use_rslora": False,
                    "use_dora": False,
                    "fan_in_fan_out": False,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "modules_to_save": None,
                },
                indent=2,
            )
        )
        folders.append(folder)
    return folders


def write_base(out: Path, dims: dict, *, layers: int, vocab: int, seed: int = 1) -> Path:
    """A random causal LM with these widths, ``layers`` deep, in float32 (one shard per layer)."""
    folder = out / "base"
    folder.mkdir(parents=True, exist_ok=True)
    h = dims["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})

    shard(
        "embed.safetensors",
        {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02},
    )
    shapes = module_shapes(dims, layers)
    for i in range(layers):
        tensors = {
            f"{p}.weight": torch.randn(*s, generator=g) * 0.02
            for p, s in shapes.items()
            if p.startswith(f"model.layers.{i}.")
        }
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
        if dims["model_type"] == "qwen2":
            kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
            tensors[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.zeros(h)
            tensors[f"model.layers.{i}.self_attn.k_proj.bias"] = torch.zeros(kv)
            tensors[f"model.layers.{i}.self_attn.v_proj.bias"] = torch.zeros(kv)
        shard(f"layer-{i:03d}.safetensors", tensors)
    shard(
        "head.safetensors",
        {
            "model.norm.weight": torch.ones(h),
            "lm_head.weight": torch.randn(vocab, h, generator=g) * 0.02,
        },
    )
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = {
        "architectures": dims["architectures"],
        "model_type": dims["model_type"],
        "hidden_size": h,
        "intermediate_size": dims["intermediate_size"],
        "num_attention_heads": dims["num_attention_heads"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", choices=sorted(PRESETS) + sorted(CONFIG_PRESETS), default="qwen2.5-vl-7b"
    )
    ap.add_argument("--config", type=Path, help="a config.json to read the widths from instead")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="depth (default: the model's)")
    ap.add_argument("--base", action="store_true", help="also write a random base model")
    ap.add_argument("--vocab", type=int, default=32000, help="vocab of the random base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.config:
        dims = dims_from_config(args.config)
    elif args.preset in CONFIG_PRESETS:
        if not CONFIG_PRESETS[args.preset].is_file():
            sys.exit(
                f"error: {CONFIG_PRESETS[args.preset]}: not found (needs ../shared beside the repo)"
            )
        dims = dims_from_config(CONFIG_PRESETS[args.preset])
    else:
        dims = PRESETS[args.preset]
    layers = args.layers or dims["num_hidden_layers"]
    write_adapters(args.out, dims, count=args.count, rank=args.rank, layers=layers, seed=args.seed)
    if args.base:
        write_base(args.out, dims, layers=layers, vocab=args.vocab)
    print(f"wrote {args.count} rank-{args.rank} adapters ({layers} layers) to {args.out}")


if __name__ == "__main__":
    main()
