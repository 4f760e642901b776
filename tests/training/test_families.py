"""Family table: detection, and LoRA on the language model only (never vision tower/projector)."""

from __future__ import annotations

import re

import pytest
import torch

from emomerge.merging.errors import InputError
from emomerge.training.models.families import FAMILIES, detect_family

from .conftest import ALL_FAMILIES

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_table_covers_the_six_families():
    assert sorted(FAMILIES) == sorted(ALL_FAMILIES)
    assert {f.llamafactory_template for f in FAMILIES.values()} == {
        "qwen2_vl",
        "qwen3_vl_nothink",
        "mllama",
        "llava",
        "llava_next_mistral",
        "pixtral",
    }


@pytest.mark.parametrize(
    "hub_id,family",
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
        ("unsloth/Qwen2.5-VL-32B-Instruct-bnb-4bit", "qwen2_5_vl"),
        ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl"),
        ("meta-llama/Llama-3.2-11B-Vision-Instruct", "mllama"),
        ("llava-hf/llava-1.5-7b-hf", "llava"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
        ("mistral-community/pixtral-12b", "pixtral"),
    ],
)
def test_detect_from_hub_id(hub_id, family):
    assert detect_family(hub_id) == family


def test_detect_unknown_name_is_input_error():
    with pytest.raises(InputError, match="cannot tell the model family"):
        detect_family("someone/bert-base")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_detect_from_saved_config(tiny_model, family):
    # Pixtral checkpoints load as "llava": detection must look at the vision config.
    assert detect_family(tiny_model(family)) == family


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_regex_wraps_language_model_only(tiny_model, family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    spec = FAMILIES[family]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    # Independent reference: every Linear projection whose path lies in the language model.
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.split(".")[-1] in _PROJ
        and ".language_model." in f".{n}."
    }
    vision_linear = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(spec.vision_modules)
    }
    assert expected and vision_linear
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=spec.lora_target_regex))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)
    }
    assert wrapped == expected
    assert not any(n.startswith(spec.vision_modules) for n in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_plain_module_list_would_wrap_the_vision_tower(tiny_model):
    """Why the regex exists: bare names also match the vision tower's MLP (docs/DESIGN.md, Facts)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_5_vl"))
    names = [n for n, _ in model.named_modules()]
    bare = [n for n in names if n.split(".")[-1] in _PROJ]
    regex = [n for n in names if re.fullmatch(FAMILIES["qwen2_5_vl"].lora_target_regex, n)]
    assert any(n.startswith("model.visual") for n in bare)
    assert not any(n.startswith("model.visual") for n in regex)
