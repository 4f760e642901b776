"""Loading decisions: 4-bit QLoRA and bf16 only with CUDA, a clear message otherwise."""

from __future__ import annotations

import pytest
from emomerge.merging.errors import InputError
from emomerge.training.models import load_vlm, machine_precision, plan_precision


@pytest.mark.parametrize("q4,dtype,device,cuda,bnb,want", [
    (False, None, "cpu", False, False, ("float32", False)),
    (False, None, "cpu", True, True, ("float32", False)),
    (False, None, "cuda", True, False, ("bfloat16", False)),
    (True, None, "cuda", True, True, ("bfloat16", True)),
    (True, "float16", "cuda:1", True, True, ("float16", True)),
    (False, "bfloat16", "cpu", False, False, ("bfloat16", False)),
])
def test_plan(q4, dtype, device, cuda, bnb, want):
    plan = plan_precision(quantize_4bit=q4, dtype=dtype, device=device, cuda_available=cuda,
                          bnb_available=bnb)
    assert (plan.dtype, plan.quantize_4bit) == want and plan.device == device


@pytest.mark.parametrize("device,cuda,bnb,msg", [
    ("cpu", False, True, "4-bit QLoRA needs a CUDA GPU"),
    ("cpu", True, True, "4-bit QLoRA needs a CUDA GPU"),
    ("cuda", True, False, "needs bitsandbytes"),
])
def test_4bit_refused_with_a_clear_message(device, cuda, bnb, msg):
    with pytest.raises(InputError, match=msg):
        plan_precision(quantize_4bit=True, dtype=None, device=device, cuda_available=cuda,
                       bnb_available=bnb)


def test_cuda_device_without_cuda():
    with pytest.raises(InputError, match="CUDA is not available"):
        plan_precision(quantize_4bit=False, dtype=None, device="cuda", cuda_available=False,
                       bnb_available=False)


def test_this_machine_refuses_4bit_before_loading(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path is the CPU one")
    assert machine_precision().device == "cpu"
    with pytest.raises(InputError, match="CUDA GPU"):
        load_vlm(tiny_model("llava"), quantize_4bit=True)


def test_load_vlm_sets_family_and_template(tiny_model):
    model, processor, family = load_vlm(tiny_model("pixtral"))
    assert family == "pixtral" and type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.chat_template and "[INST]" in processor.chat_template
    assert next(model.parameters()).dtype.__repr__() == "torch.float32"
