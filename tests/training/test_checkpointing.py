"""Activation checkpointing: the decision for the device, and that `true` really recomputes."""

from __future__ import annotations

import pytest
import torch

from emomerge.training.curriculum import parse_curriculum
from emomerge.training.trainer import build_stage_model, enable_checkpointing, plan_checkpointing


@pytest.mark.parametrize(
    "setting,device,want",
    [
        ("auto", "cuda", True),
        ("auto", "cuda:1", True),
        ("auto", "cpu", False),
        (True, "cpu", True),
        (False, "cuda", False),
        (True, "cuda:0", True),
    ],
)
def test_decision(setting, device, want):
    assert plan_checkpointing(setting, device) is want


def _cur(base, **train):
    return parse_curriculum(
        {
            "base_model": str(base),
            "lora": {"r": 4, "alpha": 8},
            "train": {"lr": 1e-3, **train},
            "stages": [{"name": "s", "dataset": "emoart", "path": "x", "steps": 1}],
        }
    )


def _layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _step(model, batch):
    """One forward + backward; returns the loss, the LoRA grads and the decoder-layer calls."""
    calls = []
    # a module inside the layer (the layer's own hooks stay outside the checkpoint), hooked
    # before it runs (torch's recompute stops early, once the last saved tensor is rebuilt)
    handle = _layers(model)[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_true_recomputes_and_gives_the_same_gradients(family, tiny_model, synthetic):
    from emomerge.training.data import read_dataset
    from emomerge.training.models.batching import encode_batch

    base = tiny_model(family)
    samples = read_dataset("emoart", synthetic["emoart"], "train", None)[:2]
    results = {}
    for setting in (False, True):
        torch.manual_seed(0)  # the same fresh LoRA factors both times
        model, processor = build_stage_model(
            _cur(base, gradient_checkpointing=setting), str(base), family, []
        )
        flags = {bool(getattr(m, "gradient_checkpointing", False)) for m in _layers(model)}
        assert flags == {setting}
        batch = encode_batch(processor, family, samples)
        results[setting] = _step(model, batch)
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results[False], results[True]
    assert (calls0, calls1) == (1, 2)  # checkpointed: the MLP runs again in the backward
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    assert all(torch.allclose(grads0[k], grads1[k], atol=1e-6, rtol=1e-5) for k in grads0)
    assert any(g.abs().sum() > 0 for g in grads1.values())


def test_auto_is_off_on_cpu(tiny_model):
    base = tiny_model("qwen2_5_vl")
    model, _ = build_stage_model(_cur(base), str(base), "qwen2_5_vl", [])
    assert not any(getattr(m, "gradient_checkpointing", False) for m in _layers(model))


def test_enable_sets_the_peft_prerequisites(tiny_model):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("llava"))
    enable_checkpointing(model)
    assert model.config.use_cache is False
    assert model.is_gradient_checkpointing
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # enable_input_require_grads' hook
