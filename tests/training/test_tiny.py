"""Tiny offline VLMs: reload through the Auto classes, small, with working tokenizer/template."""

from __future__ import annotations

import pytest

from emomerge.merging.errors import InputError
from emomerge.training.models.families import FAMILIES
from emomerge.training.models.tiny import build_tiny_vlm

from .conftest import ALL_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tiny_model_reloads_with_auto_classes(tiny_model, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_model(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == FAMILIES[family].model_class
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 4_000_000
    tok = processor.tokenizer
    text = "怒りと喜び: Anger, Joy"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    image_token = FAMILIES[family].image_token
    assert len(tok(image_token, add_special_tokens=False)["input_ids"]) == 1
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count(image_token) == 1 and "Hi" in prompt


def test_same_seed_same_weights(tmp_path, tiny_model):
    from safetensors.torch import load_file

    again = build_tiny_vlm("llava", tmp_path / "again", seed=0)
    a = load_file(tiny_model("llava") / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        build_tiny_vlm("llava", tmp_path / "m")
    assert (tmp_path / "m" / "x").read_text() == "keep me"


def test_unknown_family():
    with pytest.raises(InputError, match="unknown family"):
        build_tiny_vlm("gpt2", "/nonexistent/never-written")
