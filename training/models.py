"""Loading a VLM + processor by family, with the precision/quantisation decision made explicit."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .families import detect_family, get_family


@dataclass(frozen=True)
class PrecisionPlan:
    """What to load with: dtype name, 4-bit or not, and why (shown to the user)."""

    dtype: str
    quantize_4bit: bool
    device: str
    reason: str


def plan_precision(*, quantize_4bit: bool, dtype: str | None, device: str,
                   cuda_available: bool, bnb_available: bool) -> PrecisionPlan:
    """Decide dtype and 4-bit loading (QLoRA) from the request and the machine.

    - CUDA present: bf16 by default; 4-bit NF4 via bitsandbytes when asked (needs bitsandbytes).
    - CPU: float32 by default; 4-bit is refused with a clear message (bitsandbytes' 4-bit
      kernels need a CUDA GPU) instead of failing deep inside the loader.
    """
    on_cuda = device.startswith("cuda")
    if on_cuda and not cuda_available:
        raise InputError(f"device '{device}' requested but CUDA is not available on this machine")
    if quantize_4bit:
        if not on_cuda:
            raise InputError(
                "4-bit QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); this run is on CPU: "
                "drop quantize_4bit / --4bit or run on a GPU machine")
        if not bnb_available:
            raise InputError("4-bit QLoRA needs bitsandbytes: pip install 'emomerge[gpu]'")
        return PrecisionPlan(dtype or "bfloat16", True, device,
                             "CUDA + bitsandbytes: 4-bit NF4 base, bf16 compute (QLoRA)")
    if on_cuda:
        return PrecisionPlan(dtype or "bfloat16", False, device, "CUDA: bf16 weights")
    return PrecisionPlan(dtype or "float32", False, device, "CPU: float32 weights")


def machine_precision(quantize_4bit: bool = False, dtype: str | None = None,
                      device: str | None = None) -> PrecisionPlan:
    """:func:`plan_precision` for this machine (device defaults to cuda when available)."""
    import torch

    cuda = torch.cuda.is_available()
    return plan_precision(quantize_4bit=quantize_4bit, dtype=dtype,
                          device=device or ("cuda" if cuda else "cpu"), cuda_available=cuda,
                          bnb_available=importlib.util.find_spec("bitsandbytes") is not None)


def load_processor(name_or_path: str | Path, family: str) -> Any:
    """The checkpoint's processor, with the family's chat template when it ships none."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(name_or_path))
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = get_family(family).chat_template
    return processor


def load_vlm(name_or_path: str | Path, family: str | None = None, dtype: str | None = None,
             device: str = "cpu", quantize_4bit: bool = False) -> tuple[Any, Any, str]:
    """Load ``(model, processor, family)`` from a hub id or a local folder.

    Offline use (tests) reads local folders only; nothing is downloaded unless the user passes a
    hub id on a connected machine.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    family = family or detect_family(name_or_path)
    get_family(family)
    plan = machine_precision(quantize_4bit, dtype, device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan.dtype)}
    if plan.quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": plan.device}
    local = Path(name_or_path)
    if not local.exists() and "/" not in str(name_or_path):
        raise InputError(f"{name_or_path}: not a local folder nor a hub id (owner/name)")
    model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), **kwargs)
    if not plan.quantize_4bit:
        model.to(plan.device)
    return model, load_processor(name_or_path, family), family
