"""Loading a VLM + processor by family, with the precision/quantisation decision made explicit."""

from __future__ import annotations

import importlib.util
import re
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


#: A hub id is exactly ``owner/name``: letters, digits, ``_ . -``, neither part starting with a
#: dot or a dash (the hub's own rule, minus its legacy owner-less names such as ``gpt2``).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_local(name: str | Path, relative_to: Path | None = None) -> bool:
    """Whether a model reference is a local path rather than a hub id.

    Local: a ``Path``; anything starting with ``.``, ``/``, ``~`` or a drive (``C:``); a
    backslash; other than exactly one ``/``; a trailing ``/``; a ``.``/``..`` part; or an
    ``owner/name`` whose ``owner`` is a folder here (or beside the curriculum,
    ``relative_to``) — the user meant that folder, so a missing ``name`` in it is a typo, not a
    hub repository.
    """
    if isinstance(name, Path):
        return True
    text = str(name)
    if (text.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:", text) or "\\" in text
            or text.count("/") != 1 or text.endswith("/")
            or any(part in (".", "..") for part in text.split("/"))):
        return True
    owner = text.split("/", 1)[0]
    return any((folder / owner).is_dir() for folder in (Path.cwd(), relative_to) if folder)


def resolve_model(name_or_path: str | Path, *, where: str | None = None,
                  relative_to: Path | None = None) -> str:
    """The model reference to load: an existing local path, or a hub id (``owner/name``).

    A reference that looks local (:func:`looks_local`) and does not exist is an
    :class:`InputError` at once, never a hub lookup (which retries the network for a minute and
    ends in a traceback). ``where`` prefixes the message (the curriculum file and key).
    """
    text = str(name_or_path)
    head = f"{where}: " if where else ""
    if Path(text).is_dir() and not (Path(text) / "config.json").is_file():
        raise InputError(f"{head}{text}: no config.json (not a model checkpoint folder)")
    if Path(text).exists():
        return text
    if text.startswith("~") and Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    if looks_local(name_or_path, relative_to):
        shown = Path(text).expanduser()
        if relative_to is not None and not shown.is_absolute():
            shown = relative_to / shown
        raise InputError(f"{head}model folder {shown} not found (a hub id is exactly owner/name)")
    if not HUB_ID.match(text) or ".." in text or "--" in text:
        raise InputError(f"{head}{text}: not a local folder nor a hub id (owner/name)")
    return text


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
    hub id on a connected machine. A missing local path is refused before anything is imported
    (:func:`resolve_model`); a checkpoint transformers cannot open is one line naming it.
    """
    name_or_path = resolve_model(name_or_path)
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
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        processor = load_processor(name_or_path, family)
    except OSError as exc:  # transformers' "not found / no config.json / cannot connect"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{name_or_path}: cannot load the model ({first})") from exc
    if not plan.quantize_4bit:
        model.to(plan.device)
    return model, processor, family
