"""Tiny real models (from transformers config classes) and random PEFT LoRAs on them.

Settings are the verified tiny ones (docs/DESIGN.md, Facts): text hidden 64, 2 layers, 4 heads (2 kv), vocab 400;
vision hidden 32, depth 2. Each model builds, saves and reloads in well under a second.

The dense reference ΔW of a saved adapter is computed here from PEFT's definition
(ΔW = (α/r)·B@A, read straight from ``adapter_model.safetensors``), independently of
emomerge's reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

VOCAB = 400
#: LoRA on the language model only, for every VLM family (docs/DESIGN.md, Facts: plain module names also
#: wrap vision-tower MLPs).
LM_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: A text model has no ``language_model`` in its names.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**_TEXT)


def qwen25vl_config():
    from transformers import Qwen2_5_VLConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(_TEXT, model_type="qwen2_5_vl_text", rope_parameters=rope)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB - 3,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 4,
        vision_end_token_id=VOCAB - 5,
        tie_word_embeddings=False,
    )


def llava_config():
    from transformers import LlavaConfig

    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 32,
    }
    text = dict(_TEXT, model_type="llama")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 1,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def mllama_config():
    from transformers import MllamaConfig

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
        "vision_output_dim": 64,
        "intermediate_layers_indices": [0],
        "max_num_tiles": 4,
    }
    # Mllama embeds vocab + 8 rows and needs its special ids inside the tiny vocabulary.
    text = dict(_TEXT, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 1,
        tie_word_embeddings=False,
    )


CONFIGS = {
    "llama": (llama_config, "causal"),
    "qwen2_5_vl": (qwen25vl_config, "vlm"),
    "llava": (llava_config, "vlm"),
    "mllama": (mllama_config, "vlm"),
}


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if kind == "causal" else AutoModelForImageTextToText


def build_base(family: str, folder: Path, *, seed: int = 0) -> Path:
    """Random float32 base model of ``family``, saved with ``save_pretrained`` into ``folder``."""
    make_config, kind = CONFIGS[family]
    torch.manual_seed(seed)
    model = auto_class(kind).from_config(make_config(), dtype=torch.float32)
    # Random init leaves some weights at exact constants (norms at 1): perturb every tensor so
    # that a dropped or mis-copied tensor cannot pass by accident.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    model.save_pretrained(folder)
    return Path(folder)


def load_model(family: str, folder: Path):
    _, kind = CONFIGS[family]
    return auto_class(kind).from_pretrained(folder, dtype=torch.float32).eval()


def make_loras(
    family: str,
    base: Path,
    outs: list[Path],
    *,
    seeds: list[int],
    r: int = 4,
    alpha: float = 8,
    scale: float = 0.2,
) -> list[Path]:
    """PEFT LoRAs on the language model of ``base`` with random non-zero A and B, one per seed.

    One model load and one ``get_peft_model``; the factors are re-drawn and saved per adapter.
    """
    from peft import LoraConfig, get_peft_model

    model = load_model(family, base)
    targets = TEXT_TARGETS if family == "llama" else LM_REGEX
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]
    for out, seed in zip(outs, seeds):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in lora:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        peft_model.save_pretrained(out)
    return [Path(o) for o in outs]


def dense_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """{module path as PEFT saved it (no ``base_model.model.``): ΔW = (α/r)·B@A, float64}."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert not (
        config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern")
    )
    s = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model.") : -len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            out[path] = s * (b.double() @ a.double())
    return out


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (single file or sharded with an index)."""
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


# -- session builds: one base + adapters per family, shared by every test module -------------
@dataclass
class Tiny:
    family: str
    base: Path
    adapters: list[Path]

    def base_key(self, path: str) -> str:
        """The base checkpoint's tensor name of an adapter module (PEFT in-memory name)."""
        return base_key(self.family, path)


def base_key(family: str, path: str) -> str:
    """``save_pretrained`` writes Qwen2.5-VL, LLaVA and Mllama in legacy layouts (docs/DESIGN.md, Facts)."""
    lm = "model.language_model."
    if family == "llama":
        return path + ".weight"
    assert path.startswith(lm), path
    rest = path[len(lm) :]
    if family == "qwen2_5_vl":
        return "model." + rest + ".weight"
    return "language_model.model." + rest + ".weight"  # llava, mllama


_BUILT: dict[tuple[str, int], Tiny] = {}


def tiny_family(tmp_path_factory, family: str, n_adapters: int = 3) -> Tiny:
    """Base + ``n_adapters`` random rank-4 LoRAs of ``family``, built once per test session."""
    key = (family, n_adapters)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"tiny_{family}")
        base = build_base(family, root / "base", seed=7)
        adapters = make_loras(
            family,
            base,
            [root / f"lora{i}" for i in range(n_adapters)],
            seeds=[100 + i for i in range(n_adapters)],
        )
        _BUILT[key] = Tiny(family, base, adapters)
    return _BUILT[key]


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits
