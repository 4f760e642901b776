"""Estimated peak GPU memory of training and evaluation for every shipped experiment.

Usage:
    python benchmarks/memory_plan.py [--text-tokens 256] [--gpu-gb 80] [--experiments experiments]

For each ``experiments/*.yaml`` × architecture it prints, as a Markdown table, the image tokens
of one EmoComics35 page (1988 × 3052 px) under the family's cap (``train.max_pixels`` or the
family default, computed with the real checkpoint's processor settings, no weights), then the
estimated peak of training (bf16 or 4-bit weights, LoRA + AdamW states, activations with and
without activation checkpointing, at the experiment's batch size) and of evaluation (weights +
KV cache + logits of a page prompt), and the largest batch that fits ``--gpu-gb``.

Model dimensions: the configs in ``../shared/data/real_adapters`` where present (Llama-3.2-11B-
Vision), otherwise built here from transformers' config classes with the real checkpoints'
dimensions (:data:`REAL`, each citing its hub model). Parameter counts are exact: the model is
instantiated on the meta device.

Formula (bytes; h hidden, I MLP width, L decoder layers incl. Mllama's cross-attention ones,
kv = key/value width, V vocabulary, s = image + text tokens, b = batch):

- weights: 2 B/param (bf16); 4-bit: every ``nn.Linear`` but the head at 4.127 bits (NF4 +
  double-quantised scales) and the rest in fp32 (``prepare_model_for_kbit_training`` upcasts
  norms and embeddings), evaluation keeps the rest in bf16.
- LoRA on the language model's 7 projections (the family regex), rank r: r·(in + out) per
  module, 16 B/param (fp32 weight, grad, Adam m and v).
- Mllama's cross-attention layers also keep, per vision token (4 tiles × 1,601 for a page),
  4kv + 2h (6h with dropout) for their LoRA k/v inputs and attention K/V; the projected vision
  states are kept once (2h per vision token).
- activations kept for backward, per token and decoder layer (bf16, flash/SDPA attention that
  keeps no s² matrix, frozen base weights keep no inputs of their own):
  20h + 4kv + 8I (two RMSNorms upcast to fp32, q/k/v/o inputs for LoRA, attention q/k/v/out,
  SwiGLU gate/up/act/product), plus 16h + 3I with LoRA dropout > 0 (each adapted module keeps
  its dropped input copy and a 1-byte mask).
  With activation checkpointing only each layer's input (2h) is kept, plus one layer's full set
  while it is recomputed.
- logits: s·V·12 (bf16 logits, their fp32 upcast, fp32 log-softmax and the bf16 gradient).
- runtime: 1 GB (CUDA context, cuBLAS workspace). The frozen vision tower keeps nothing for
  backward (no input or parameter of it needs a gradient); its transient forward peak is small
  next to the language model's at these token counts and is left out.
- evaluation (no grad): weights + the page prompt's logits (s·V·2) + KV cache 2·L·kv·s·2 bytes
  held 17 times (the prompt's cache plus a chunk of 16 label sets scored on copies of it,
  ``evaluation.scoring.score_labels``) + runtime.

Sanity anchor (measured on an H200): Qwen2.5-VL-7B, bf16, 7,739 image tokens, batch 1, no
checkpointing: 94.7 GB. With 256 text tokens the formula gives 108.5 GB with the curricula's
LoRA dropout 0.05 and 82.9 GB without dropout (printed under the table): it brackets the measurement and errs high
with dropout, which is the safe side for "fits" decisions. Not modelled: allocator
fragmentation, DeepSpeed/FSDP sharding, multi-image samples.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "real_adapters"
GB = 1e9

#: Real dimensions of the checkpoints the experiments name (their ``config.json`` on the hub).
REAL: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        cls="Qwen2_5_VLConfig",
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-VL-72B-Instruct": dict(
        cls="Qwen2_5_VLConfig",
        text_config=dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=152064,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3456,
            num_heads=16,
            out_hidden_size=8192,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        cls="Qwen3VLConfig",
        text_config=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.2-90B-Vision-Instruct": dict(
        cls="MllamaConfig",
        text_config=dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=100,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            cross_attention_layers=list(range(3, 100, 5)),
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_global_layers=8,
            attention_heads=16,
            image_size=560,
            patch_size=14,
            max_num_tiles=4,
            vision_output_dim=7680,
            intermediate_layers_indices=[3, 7, 15, 23, 30],
        ),
    ),
    "llava-hf/llava-1.5-7b-hf": dict(
        cls="LlavaConfig",
        text_config=dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        vision_feature_layer=-2,
        image_seq_length=576,
    ),
    "llava-hf/llava-v1.6-mistral-7b-hf": dict(
        cls="LlavaNextConfig",
        text_config=dict(
            model_type="mistral",
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32064,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
    ),
    "mistral-community/pixtral-12b": dict(
        cls="LlavaConfig",
        text_config=dict(
            model_type="mistral",
            hidden_size=5120,
            intermediate_size=14336,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=131072,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            head_dim=64,
            image_size=1024,
            patch_size=16,
        ),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    ),
}

#: Configs read from ../shared/data instead (the real files).
SHARED_CONFIGS = {
    "meta-llama/Llama-3.2-11B-Vision-Instruct": "llama-3.2-11b-vision-base",
    "Qwen/Qwen2.5-VL-32B-Instruct": "qwen2.5-vl-32b-base",
}


def load_config(hub_id: str) -> Any:
    """The transformers config of ``hub_id``: the shared real file, else :data:`REAL`."""
    import transformers

    if hub_id in SHARED_CONFIGS and (SHARED / SHARED_CONFIGS[hub_id] / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(SHARED / SHARED_CONFIGS[hub_id])
    if hub_id not in REAL:
        raise KeyError(f"{hub_id}: no real dimensions known (add it to REAL)")
    spec = dict(REAL[hub_id])
    return getattr(transformers, spec.pop("cls"))(**spec)


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from one model: exact counts and the LM's dimensions."""

    params: int
    linear: int  # nn.Linear weights but the output head (what NF4 quantises)
    lora: int  # LoRA parameters at rank 1 (× r) on the family's target modules
    hidden: int
    intermediate: int
    layers: int
    self_attn_layers: int  # layers holding a KV cache of the text (Mllama: not the cross ones)
    kv: int
    vocab: int


_FACTS: dict[str, ModelFacts] = {}


def model_facts(hub_id: str, family: str) -> ModelFacts:
    """Exact parameter counts of ``hub_id`` (instantiated on the meta device, once)."""
    if hub_id in _FACTS:
        return _FACTS[hub_id]
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    from emomerge.training.models.families import get_family

    config = load_config(hub_id)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    head = model.get_output_embeddings()
    target = re.compile(get_family(family).lora_target_regex)
    params = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            linear += m.weight.numel()
            if target.fullmatch(name):
                lora += m.in_features + m.out_features
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cross = len(getattr(text, "cross_attention_layers", None) or [])
    facts = ModelFacts(
        params,
        linear,
        lora,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.num_hidden_layers - cross,
        text.num_key_value_heads * head_dim,
        text.vocab_size,
    )
    _FACTS[hub_id] = facts
    return facts


NF4 = 4.127 / 8
RUNTIME = 1.0 * GB


def activation_bytes(f: ModelFacts, dropout: bool) -> int:
    """Bytes kept for backward per token and decoder layer (module docstring)."""
    h, i, kv = f.hidden, f.intermediate, f.kv
    return 20 * h + 4 * kv + 8 * i + ((16 * h + 3 * i) if dropout else 0)


def training_peak(
    f: ModelFacts,
    *,
    tokens: int,
    batch: int,
    quantize_4bit: bool,
    checkpointing: bool,
    r: int,
    dropout: bool,
    cross_tokens: int = 0,
) -> dict[str, float]:
    """Estimated peak bytes of one training step, by component (module docstring)."""
    rest = f.params - f.linear
    weights = (NF4 * f.linear + 4 * rest) if quantize_4bit else 2 * f.params
    per_layer = activation_bytes(f, dropout) * tokens * batch
    cross_layers = f.layers - f.self_attn_layers
    # Mllama: each cross-attention layer's LoRA k/v keep their vision-token inputs, attention
    # its K and V; the projected vision states themselves are kept once
    cross = (4 * f.kv + (6 if dropout else 2) * f.hidden) * cross_tokens * batch
    shared = 2 * f.hidden * cross_tokens * batch
    if checkpointing:
        acts = 2 * f.hidden * tokens * batch * f.layers + per_layer + cross + shared
    else:
        acts = per_layer * f.layers + cross * cross_layers + shared
    parts = {
        "weights": weights,
        "lora+adam": 16 * r * f.lora,
        "activations": acts,
        "logits": 12 * f.vocab * tokens * batch,
        "runtime": RUNTIME,
    }
    parts["total"] = sum(parts.values())
    return parts


def eval_peak(f: ModelFacts, *, tokens: int, quantize_4bit: bool) -> dict[str, float]:
    """Estimated peak bytes of scoring one page prompt (module docstring)."""
    weights = (NF4 * f.linear + 2 * (f.params - f.linear)) if quantize_4bit else 2 * f.params
    kv = 2 * f.self_attn_layers * f.kv * tokens * 2 * 17
    parts = {"weights": weights, "kv": kv, "logits": 2 * f.vocab * tokens, "runtime": RUNTIME}
    parts["total"] = sum(parts.values())
    return parts


def max_batch(f: ModelFacts, gpu_bytes: float, **kw: Any) -> int:
    """The largest batch whose training peak fits ``gpu_bytes`` (0: not even one)."""
    b = 0
    while b < 256 and training_peak(f, batch=b + 1, **kw)["total"] <= gpu_bytes:
        b += 1
    return b


@dataclass
class Row:
    experiment: str
    arch: str
    hub_id: str
    family: str
    params: int
    page_tokens: int
    cross_tokens: int  # Mllama: vision tokens read through cross-attention
    tokens: int
    batch: int
    quantize_4bit: bool
    checkpointing_cuda: bool
    train_ckpt: float
    train_no_ckpt: float
    eval_gb: float
    eval_4bit_gb: float
    max_batch_ckpt: int
    max_batch_no_ckpt: int


def page_tokens(family: str, max_pixels: int | None) -> tuple[int, int]:
    """(text-sequence image tokens, cross-attention vision tokens) of one page under the cap,
    with the real checkpoint's processor settings."""
    from emomerge.training.models.families import PAGE, apply_image_cap, image_tokens, vision_tokens
    from emomerge.training.models.tiny import real_processor

    processor = real_processor(family)
    apply_image_cap(processor, family, max_pixels)
    cross = vision_tokens(processor, family, *PAGE) if family == "mllama" else 0
    return image_tokens(processor, family, *PAGE), cross


def plan_rows(
    experiments: Path = REPO / "experiments", text_tokens: int = 256, gpu_gb: float = 80
) -> list[Row]:
    """One :class:`Row` per shipped experiment × architecture."""
    from emomerge.experiment.config import load_experiment
    from emomerge.training.curriculum import LoraSettings, TrainSettings
    from emomerge.training.trainer import plan_checkpointing

    rows = []
    for path in sorted(experiments.glob("*.yaml")):
        exp = load_experiment(path)
        for arch in exp.spec.architectures:
            train = TrainSettings.model_validate(exp.train_of(arch))
            lora = LoraSettings.model_validate(exp.lora_of(arch))
            family = arch.family
            f = model_facts(arch.model, family)
            img, cross = page_tokens(family, train.max_pixels)
            tokens = img + text_tokens
            kw = dict(
                tokens=tokens,
                quantize_4bit=train.quantize_4bit,
                r=lora.r,
                dropout=lora.dropout > 0,
                cross_tokens=cross,
            )
            ckpt = plan_checkpointing(train.gradient_checkpointing, "cuda")
            rows.append(
                Row(
                    exp.spec.name,
                    arch.name or family,
                    arch.model,
                    family,
                    f.params,
                    img,
                    cross,
                    tokens,
                    train.batch_size,
                    train.quantize_4bit,
                    ckpt,
                    training_peak(f, batch=train.batch_size, checkpointing=True, **kw)["total"]
                    / GB,
                    training_peak(f, batch=train.batch_size, checkpointing=False, **kw)["total"]
                    / GB,
                    eval_peak(f, tokens=tokens, quantize_4bit=False)["total"] / GB,
                    eval_peak(f, tokens=tokens, quantize_4bit=True)["total"] / GB,
                    max_batch(f, gpu_gb * GB, checkpointing=True, **kw),
                    max_batch(f, gpu_gb * GB, checkpointing=False, **kw),
                )
            )
    return rows


def anchor() -> dict[str, float]:
    """The formula at the H200 measurement: Qwen2.5-VL-7B, 7,739 image tokens, batch 1."""
    f = model_facts("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl")
    kw = dict(tokens=7739 + 256, batch=1, quantize_4bit=False, checkpointing=False, r=8)
    return {
        "dropout 0.05": training_peak(f, dropout=True, **kw)["total"] / GB,
        "no dropout": training_peak(f, dropout=False, **kw)["total"] / GB,
        "measured": 94.7,
    }


def table(rows: list[Row], gpu_gb: float) -> str:
    head = (
        "| experiment | architecture | params | page tokens | seq | batch | 4-bit | "
        "train GB (ckpt) | train GB (no ckpt) | eval GB bf16 | eval GB 4-bit | "
        f"max batch on {gpu_gb:g} GB (ckpt / no ckpt) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.experiment} | {r.arch} | {r.params / 1e9:.1f} B | {r.page_tokens}"
            f"{f' (+{r.cross_tokens} x-attn)' if r.cross_tokens else ''} | "
            f"{r.tokens} | {r.batch} | {'yes' if r.quantize_4bit else 'no'} | "
            f"{r.train_ckpt:.1f} | {r.train_no_ckpt:.1f} | {r.eval_gb:.1f} | "
            f"{r.eval_4bit_gb:.1f} | {r.max_batch_ckpt} / {r.max_batch_no_ckpt} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--text-tokens",
        type=int,
        default=256,
        help="prompt + answer text tokens next to the page's image tokens",
    )
    ap.add_argument("--gpu-gb", type=float, default=80)
    ap.add_argument("--experiments", type=Path, default=REPO / "experiments")
    ap.add_argument("--json", action="store_true", help="rows as JSON instead of a table")
    args = ap.parse_args()
    rows = plan_rows(args.experiments, args.text_tokens, args.gpu_gb)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    print(
        f"{dt.date.today()} · {platform.node()} · {platform.processor() or platform.machine()}"
        f" · python {sys.version.split()[0]} · text tokens {args.text_tokens}"
    )
    print(table(rows, args.gpu_gb))
    a = anchor()
    print(
        f"\nanchor (Qwen2.5-VL-7B, 7,739 image tokens, batch 1, no checkpointing): formula "
        f"{a['dropout 0.05']:.1f} GB (LoRA dropout 0.05) / {a['no dropout']:.1f} GB (none), "
        f"measured {a['measured']} GB"
    )


if __name__ == "__main__":
    main()
