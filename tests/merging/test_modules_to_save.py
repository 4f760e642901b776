"""modules_to_save (full tensors in an adapter): task vector W_saved − W_base, merged like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging import merge
from emomerge.merging.errors import MergeInputError


@pytest.fixture(scope="module")
def lm_head_adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mts")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    heads = []
    for i in range(2):
        model = LlamaForCausalLM.from_pretrained(root / "base")
        peft = get_peft_model(
            model,
            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
                    heads.append(p.detach().clone())
        peft.save_pretrained(root / f"a{i}")
    return root, heads


def test_saved_tensors_need_the_base(lm_head_adapters, tmp_path):
    root, _ = lm_head_adapters
    with pytest.raises(MergeInputError, match="modules_to_save.*--base"):
        merge("linear", [root / "a0", root / "a1"], tmp_path / "o")


def test_saved_tensors_merge_and_load_in_peft(lm_head_adapters, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, heads = lm_head_adapters
    base_head = load_file(str(root / "base" / "model.safetensors"))["lm_head.weight"]
    merge(
        "linear",
        [root / "a0", root / "a1"],
        tmp_path / "full",
        weights=[0.25, 0.75],
        output="full",
        base=root / "base",
    )
    merge(
        "linear",
        [root / "a0", root / "a1"],
        tmp_path / "ad",
        weights=[0.25, 0.75],
        base=root / "base",
    )
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    expect = base_head + (0.25 * (heads[0] - base_head) + 0.75 * (heads[1] - base_head))
    np.testing.assert_allclose(full["lm_head.weight"].numpy(), expect.numpy(), atol=1e-6)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        folded = LlamaForCausalLM.from_pretrained(tmp_path / "full")(ids).logits
        adapted = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(root / "base"), tmp_path / "ad"
        )(ids).logits
    assert (folded - LlamaForCausalLM.from_pretrained(root / "base")(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(adapted, folded, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lora_and_saved_head(tmp_path_factory):
    """Stage 0 trains a LoRA on lm_head; stage 1 saves lm_head whole. PEFT's merge_and_unload of
    each gives the head it applies (the oracle)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mix")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    configs = [
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ]
    heads = []
    for i, config in enumerate(configs):
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), config)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        peft.save_pretrained(root / f"a{i}")
        heads.append(peft.merge_and_unload().lm_head.weight.detach().clone())
    return root, heads


@pytest.mark.parametrize("output", ["full", "adapter"])
def test_a_module_that_is_a_lora_in_one_input_and_saved_in_another_is_updated_once(
    lora_and_saved_head, tmp_path, output
):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, heads = lora_and_saved_head
    base_head = load_file(str(root / "base" / "model.safetensors"))["lm_head.weight"]
    expect = base_head + 0.25 * (heads[0] - base_head) + 0.75 * (heads[1] - base_head)
    merge(
        "linear",
        [root / "a0", root / "a1"],
        tmp_path / "out",
        weights=[0.25, 0.75],
        output=output,
        base=root / "base",
    )
    if output == "full":
        head = load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"]
    else:
        keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
        assert not [k for k in keys if "lm_head.lora" in k]  # saved whole, not as a LoRA too
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(root / "base"), tmp_path / "out"
        )
        head = model.merge_and_unload().lm_head.weight.detach()
    np.testing.assert_allclose(head.numpy(), expect.numpy(), atol=1e-6)


def test_exact_evaluation_updates_such_a_module_once(lora_and_saved_head, tmp_path):
    """The in-place updates exact evaluation recomputes (merging/updates.py) for a re-factorised
    TIES adapter: the head equals the full-output merge's, and is not also a LoRA update."""
    from emomerge.merging.checkpoint import Checkpoint
    from emomerge.merging.updates import StreamedMerge, read_manifest

    root, _ = lora_and_saved_head
    kw = dict(params={"density": 0.5}, weights=[0.5, 1.0], base=root / "base")
    merge("ties", [root / "a0", root / "a1"], tmp_path / "ad", rank=1, **kw)
    merge("ties", [root / "a0", root / "a1"], tmp_path / "full", output="full", **kw)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    base = Checkpoint(root / "base")
    updates = dict(StreamedMerge(tmp_path / "ad", read_manifest(tmp_path / "ad"), base).updates())
    assert "lm_head.weight" in updates
    head = updates["lm_head.weight"](base.tensor(base.canonical["lm_head.weight"]))
    torch.testing.assert_close(head, full["lm_head.weight"], atol=0, rtol=0)
    assert (
        full["lm_head.weight"] - base.tensor(base.canonical["lm_head.weight"])
    ).abs().max() > 1e-3
