"""LoRA on embed_tokens / lm_head as PEFT saves it by default, on tied and untied bases.

PEFT's ``save_embedding_layers="auto"`` stores ``…embed_tokens.base_layer.weight`` and
``…lm_head.base_layer.weight`` beside the factors; a tied base stores no ``lm_head.weight`` at
all. Reference: the unmerged ``PeftModel`` itself (what the adapter computes), by logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging import merge

from .tiny_models import _TEXT, VOCAB

TARGETS = ["embed_tokens", "lm_head", "q_proj", "down_proj"]


def build(root, tied: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**_TEXT, "tie_word_embeddings": tied}))
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(root / "adapter")
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    return ids, expected


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_head_loras_merge_exactly(tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, expected = build(tmp_path, tied)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's default
    base_keys = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert ("lm_head.weight" in base_keys) is not tied

    full = merge(
        "task_arithmetic",
        [tmp_path / "adapter"],
        tmp_path / "full",
        output="full",
        base=tmp_path / "base",
    )
    assert full.manifest["untied_lm_head"] is tied
    assert (
        json.loads((tmp_path / "full" / "config.json").read_text())["tie_word_embeddings"] is False
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)

    merge("task_arithmetic", [tmp_path / "adapter"], tmp_path / "ad")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
