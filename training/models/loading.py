"""Loading a VLM + processor by family, with the precision/quantisation decision made explicit."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .families import apply_image_cap, detect_family, get_family


@dataclass(frozen=True)
class PrecisionPlan:
    """What to load with: dtype name, 4-bit or not, and why (shown to the user)."""

    dtype: str
    quantize_4bit: bool
    device: str
    reason: str


def plan_precision(
    *,
    quantize_4bit: bool,
    dtype: str | None,
    device: str,
    cuda_available: bool,
    bnb_available: bool,
) -> PrecisionPlan:
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
                "drop quantize_4bit / --4bit or run on a GPU machine"
            )
        if not bnb_available:
            raise InputError("4-bit QLoRA needs bitsandbytes: pip install 'emomerge[gpu]'")
        return PrecisionPlan(
            dtype or "bfloat16",
            True,
            device,
            "CUDA + bitsandbytes: 4-bit NF4 base, bf16 compute (QLoRA)",
        )
    if on_cuda:
        return PrecisionPlan(dtype or "bfloat16", False, device, "CUDA: bf16 weights")
    return PrecisionPlan(dtype or "float32", False, device, "CPU: float32 weights")


def machine_precision(
    quantize_4bit: bool = False, dtype: str | None = None, device: str | None = None
) -> PrecisionPlan:
    """:func:`plan_precision` for this machine (device defaults to cuda when available)."""
    import torch

    cuda = torch.cuda.is_available()
    return plan_precision(
        quantize_4bit=quantize_4bit,
        dtype=dtype,
        device=device or ("cuda" if cuda else "cpu"),
        cuda_available=cuda,
        bnb_available=importlib.util.find_spec("bitsandbytes") is not None,
    )


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
    if (
        text.startswith((".", "/", "~", "\\"))
        or re.match(r"^[A-Za-z]:", text)
        or "\\" in text
        or text.count("/") != 1
        or text.endswith("/")
        or any(part in (".", "..") for part in text.split("/"))
    ):
        return True
    owner = text.split("/", 1)[0]
    return any((folder / owner).is_dir() for folder in (Path.cwd(), relative_to) if folder)


def resolve_model(
    name_or_path: str | Path, *, where: str | None = None, relative_to: Path | None = None
) -> str:
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


def load_processor(
    name_or_path: str | Path,
    family: str,
    max_pixels: int | None = None,
    model_config: Any = None,
    where: str = "max_pixels",
) -> Any:
    """The checkpoint's processor, with the family's chat template when it ships none and the
    family's image-resolution cap applied (:func:`~.families.apply_image_cap`; ``max_pixels``
    None = the family default). The resolved cap is what :func:`image_cap_record` returns."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(name_or_path))
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = get_family(family).chat_template
    apply_image_cap(processor, family, max_pixels, model_config, where)
    return processor


def image_cap_record(
    name_or_path: str | Path, family: str, max_pixels: int | None = None, where: str = "max_pixels"
) -> dict[str, Any]:
    """What :func:`load_vlm` resolves the image cap to for this checkpoint (processor only, no
    weights): the ``image`` block of a stage's ``emomerge.json``."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(name_or_path))
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{name_or_path}: cannot load the processor ({first})") from exc
    return apply_image_cap(processor, family, max_pixels, where=where)


# ------------------------------------------------------------------ fitting big models


@dataclass(frozen=True)
class LoadPlan:
    """How the weights are placed: 4-bit or not, one device or spread (``device_map``)."""

    quantize_4bit: bool
    device_map: str | dict[str, str] | None
    reason: str


#: Share of a GPU's free memory the weights may take when the loader decides by itself; the
#: rest is for activations, the KV cache and the allocator's slack.
WEIGHT_SHARE = 0.85
#: bytes per parameter of a bitsandbytes NF4 Linear with double quantisation (4 bits + the
#: 8-bit block scales of 64 weights + their fp32 scales per 256 blocks ≈ 4.127 bits)
NF4_BYTES = 4.127 / 8


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def plan_loading(
    *,
    quantize_4bit: bool | str,
    device_map: str | None,
    device: str,
    cuda_available: bool,
    bnb_available: bool,
    weight_bytes: int | None = None,
    weight_bytes_4bit: int | None = None,
    free_bytes: list[int] | None = None,
) -> LoadPlan:
    """Decide 4-bit and device placement for loading a model (evaluation's big variants).

    - ``quantize_4bit=True``: NF4 as training's QLoRA (CUDA + bitsandbytes or an error), on
      ``device`` or spread with ``device_map="auto"``.
    - ``device_map="auto"``: bf16 spread over every visible GPU (accelerate); needs CUDA.
    - ``quantize_4bit="auto"`` on CUDA: the smallest change that fits, by the weights' size
      against :data:`WEIGHT_SHARE` of the free memory (``free_bytes``, one per GPU): bf16 on one
      GPU, else bf16 spread over the GPUs (merged weights can still be written exactly), else
      4-bit on one GPU (needs bitsandbytes), else 4-bit spread, else an error saying how much
      is missing. On CPU, or with no size known, "auto" loads plainly on ``device``.
    """
    on_cuda = device.startswith("cuda")
    if device_map not in (None, "auto"):
        raise InputError(f"device_map must be null or 'auto', got {device_map!r}")
    if quantize_4bit not in (True, False, "auto"):
        raise InputError(f"quantize_4bit must be true, false or 'auto', got {quantize_4bit!r}")
    if (device_map == "auto" or quantize_4bit is True) and not (on_cuda and cuda_available):
        what = "4-bit loading" if quantize_4bit is True else "device_map='auto'"
        raise InputError(
            f"{what} needs a CUDA GPU; this run is on {device}"
            + ("" if cuda_available else " (no CUDA on this machine)")
        )
    if quantize_4bit is True:
        if not bnb_available:
            raise InputError("4-bit loading needs bitsandbytes: pip install 'emomerge[gpu]'")
        return LoadPlan(
            True,
            "auto" if device_map == "auto" else {"": device},
            "asked: 4-bit NF4 (as QLoRA training)",
        )
    if device_map == "auto":
        return LoadPlan(False, "auto", "asked: bf16 spread over the GPUs")
    if quantize_4bit is False or not on_cuda or weight_bytes is None or not free_bytes:
        return LoadPlan(False, None, f"plain load on {device}")
    one = free_bytes[_gpu_index(device)] * WEIGHT_SHARE
    spread = sum(free_bytes) * WEIGHT_SHARE
    if weight_bytes <= one:
        return LoadPlan(False, None, f"bf16 weights {_gb(weight_bytes)} fit {device}")
    if len(free_bytes) > 1 and weight_bytes <= spread:
        return LoadPlan(
            False,
            "auto",
            f"bf16 weights {_gb(weight_bytes)} spread over "
            f"{len(free_bytes)} GPUs ({_gb(spread)} usable)",
        )
    q4 = weight_bytes_4bit if weight_bytes_4bit is not None else weight_bytes // 4
    if not bnb_available:
        raise InputError(
            f"the bf16 weights ({_gb(weight_bytes)}) do not fit the free GPU "
            f"memory ({_gb(spread)} usable) and 4-bit loading needs bitsandbytes: "
            "pip install 'emomerge[gpu]'"
        )
    if q4 <= one:
        return LoadPlan(True, {"": device}, f"4-bit weights {_gb(q4)} fit {device}")
    if len(free_bytes) > 1 and q4 <= spread:
        return LoadPlan(True, "auto", f"4-bit weights {_gb(q4)} spread over {len(free_bytes)} GPUs")
    raise InputError(
        f"the model does not fit: 4-bit weights {_gb(q4)}, usable GPU memory "
        f"{_gb(one)} on {device} and {_gb(spread)} on all {len(free_bytes)} GPUs"
    )


def _gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def parameter_bytes(config: Any) -> tuple[int, int]:
    """``(bf16 bytes, NF4 bytes)`` of a model built from ``config`` on the meta device.

    NF4 as bitsandbytes through transformers: every ``nn.Linear`` but the output head in 4-bit
    (:data:`NF4_BYTES`), embeddings, norms and the head in bf16.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    head = model.get_output_embeddings()
    total = linear = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        total += own
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
    return 2 * total, int(2 * (total - linear) + NF4_BYTES * linear)


def checkpoint_bytes(name_or_path: str) -> tuple[int, int] | None:
    """:func:`parameter_bytes` of a checkpoint's config (a local folder, or the hub's config
    only); None when its config cannot be read (offline hub id)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    return parameter_bytes(config)


def machine_loading(
    quantize_4bit: bool | str, device_map: str | None, device: str, name_or_path: str
) -> LoadPlan:
    """:func:`plan_loading` for this machine: CUDA, bitsandbytes, each GPU's free memory and
    the checkpoint's size (read only when the decision needs it)."""
    import torch

    cuda = torch.cuda.is_available()
    sizes, free = (None, None), None
    if quantize_4bit == "auto" and cuda and device.startswith("cuda"):
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        sizes = checkpoint_bytes(name_or_path) or (None, None)
    return plan_loading(
        quantize_4bit=quantize_4bit,
        device_map=device_map,
        device=device,
        cuda_available=cuda,
        bnb_available=importlib.util.find_spec("bitsandbytes") is not None,
        weight_bytes=sizes[0],
        weight_bytes_4bit=sizes[1],
        free_bytes=free,
    )


def nf4_config() -> Any:
    """The bitsandbytes NF4 config of QLoRA training (and of 4-bit evaluation: the same
    quantised base the adapters were trained on)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_vlm(
    name_or_path: str | Path,
    family: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    quantize_4bit: bool | str = False,
    device_map: str | None = None,
    max_pixels: int | None = None,
    where: str = "max_pixels",
) -> tuple[Any, Any, str]:
    """Load ``(model, processor, family)`` from a hub id or a local folder.

    Offline use (tests) reads local folders only; nothing is downloaded unless the user passes a
    hub id on a connected machine. A missing local path is refused before anything is imported
    (:func:`resolve_model`); a checkpoint transformers cannot open is one line naming it.
    ``quantize_4bit`` (True / False / "auto") and ``device_map`` (None / "auto") place big
    models (:func:`plan_loading`); ``max_pixels`` caps the image resolution (None: the family
    default), so training and evaluation see the same pixels.
    """
    name_or_path = resolve_model(name_or_path)
    import torch
    from transformers import AutoModelForImageTextToText

    family = family or detect_family(name_or_path)
    get_family(family)
    placement = machine_loading(quantize_4bit, device_map, device, name_or_path)
    plan = machine_precision(placement.quantize_4bit, dtype, device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan.dtype)}
    if plan.quantize_4bit:
        kwargs["quantization_config"] = nf4_config()
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        processor = load_processor(name_or_path, family, max_pixels, model.config, where)
    except OSError as exc:  # transformers' "not found / no config.json / cannot connect"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{name_or_path}: cannot load the model ({first})") from exc
    if placement.device_map is None:
        model.to(plan.device)
    return model, processor, family
