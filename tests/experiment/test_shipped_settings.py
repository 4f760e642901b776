"""Every shipped experiment's resolved memory settings: page tokens under the cap, activation
checkpointing on CUDA, and batch sizes the memory plan fits on one 80 GB GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from emomerge.experiment.config import load_experiment
from emomerge.training.curriculum import TrainSettings
from emomerge.training.models.families import IMAGE_CAPS, PAGE, apply_image_cap, image_tokens
from emomerge.training.models.tiny import real_processor
from emomerge.training.trainer import plan_checkpointing

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))
GPU = 80e9


def _memory_plan():
    """benchmarks/memory_plan.py as a module (a script, not part of the package)."""
    if "memory_plan" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "memory_plan", REPO / "benchmarks" / "memory_plan.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["memory_plan"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["memory_plan"]


#: tokens one 1988 × 3052 page adds to the text sequence, per family, under its default cap
#: (real checkpoints' processor settings; see tests/training/test_image_cap.py for the arithmetic)
PAGE_TOKENS = {
    "qwen2_5_vl": 975,
    "qwen3_vl": 975,
    "pixtral": 2752,
    "llava_next": 2160,
    "llava": 576,
    "mllama": 1,
}

#: what each shipped architecture needs: (batch size, 4-bit) as shipped
SHIPPED_ARCHS = {
    "llama_3_2_11b_vision": (1, True),
    "llama_3_2_90b_vision": (1, True),
    "llava_1_5_7b": (2, False),
    "llava_next_mistral_7b": (2, False),
    "pixtral_12b": (2, False),
    "qwen2_5_vl_7b": (2, False),
    "qwen2_5_vl_72b": (1, True),
    "qwen3_vl_8b": (2, False),
}


def _archs():
    for path in SHIPPED:
        exp = load_experiment(path)
        for arch in exp.spec.architectures:
            yield pytest.param(exp, arch, id=f"{path.stem}-{arch.name}")


def test_every_shipped_architecture_is_covered():
    names = {arch.name for path in SHIPPED for arch in load_experiment(path).spec.architectures}
    assert names == set(SHIPPED_ARCHS)


@pytest.mark.parametrize("exp,arch", list(_archs()))
def test_resolved_settings_fit_one_80gb_gpu(exp, arch):
    train = TrainSettings.model_validate(exp.train_of(arch))
    assert (train.batch_size, train.quantize_4bit) == SHIPPED_ARCHS[arch.name]
    # the shipped files leave the cap and checkpointing to their defaults
    assert train.max_pixels is None and train.gradient_checkpointing == "auto"
    assert plan_checkpointing(train.gradient_checkpointing, "cuda") is True
    assert plan_checkpointing(train.gradient_checkpointing, "cpu") is False

    processor = real_processor(arch.family)
    record = apply_image_cap(processor, arch.family, train.max_pixels)
    tokens = image_tokens(processor, arch.family, *PAGE)
    assert tokens == record["page_tokens"] == PAGE_TOKENS[arch.family]
    default = IMAGE_CAPS[arch.family].default_max_pixels
    if default is not None:
        assert record["pixels_limit"] <= default

    plan = _memory_plan()
    f = plan.model_facts(arch.model, arch.family)
    _, cross = plan.page_tokens(arch.family, train.max_pixels)
    kw = dict(
        tokens=tokens + 256,
        batch=train.batch_size,
        quantize_4bit=train.quantize_4bit,
        r=exp.lora["r"],
        dropout=exp.lora["dropout"] > 0,
        cross_tokens=cross,
    )
    on = plan.training_peak(f, checkpointing=True, **kw)["total"]
    assert on <= GPU, f"{arch.name}: {on / 1e9:.1f} GB with checkpointing"
    # evaluation: bf16 on one 80 GB GPU up to ~12B; the 72B / 90B need 4-bit (or device_map
    # "auto" over several GPUs) — the plan says so
    bf16 = plan.eval_peak(f, tokens=tokens + 256, quantize_4bit=False)["total"]
    q4 = plan.eval_peak(f, tokens=tokens + 256, quantize_4bit=True)["total"]
    assert q4 <= GPU
    assert (bf16 <= GPU) == (f.params < 20e9)


def test_checkpointing_is_what_makes_the_shipped_batches_fit():
    """Without checkpointing the plan refuses Pixtral's batch 2 and the 72B's batch 1."""
    rows = {r.arch: r for r in _memory_plan().plan_rows(REPO / "experiments")}
    assert {a for a, r in rows.items() if r.train_no_ckpt > GPU / 1e9} == {
        "pixtral_12b",
        "qwen2_5_vl_72b",
    }
    assert all(r.train_ckpt <= GPU / 1e9 and r.max_batch_ckpt >= r.batch for r in rows.values())


def test_plan_brackets_the_h200_measurement():
    """7B bf16, 7,739 image tokens, batch 1, no checkpointing: 94.7 GB measured."""
    a = _memory_plan().anchor()
    assert a["no dropout"] < a["measured"] < a["dropout 0.05"]
    assert a["dropout 0.05"] == pytest.approx(94.7, rel=0.15)
