"""Loading decisions: 4-bit QLoRA and bf16 only with CUDA, a clear message otherwise."""

from __future__ import annotations

import pytest
import torch

from emomerge.merging.errors import InputError
from emomerge.training.models.loading import (
    NF4_BYTES,
    load_vlm,
    machine_precision,
    parameter_bytes,
    plan_loading,
    plan_precision,
)


@pytest.mark.parametrize(
    "q4,dtype,device,cuda,bnb,want",
    [
        (False, None, "cpu", False, False, ("float32", False)),
        (False, None, "cpu", True, True, ("float32", False)),
        (False, None, "cuda", True, False, ("bfloat16", False)),
        (True, None, "cuda", True, True, ("bfloat16", True)),
        (True, "float16", "cuda:1", True, True, ("float16", True)),
        (False, "bfloat16", "cpu", False, False, ("bfloat16", False)),
    ],
)
def test_plan(q4, dtype, device, cuda, bnb, want):
    plan = plan_precision(
        quantize_4bit=q4, dtype=dtype, device=device, cuda_available=cuda, bnb_available=bnb
    )
    assert (plan.dtype, plan.quantize_4bit) == want and plan.device == device


@pytest.mark.parametrize(
    "device,cuda,bnb,msg",
    [
        ("cpu", False, True, "4-bit QLoRA needs a CUDA GPU"),
        ("cpu", True, True, "4-bit QLoRA needs a CUDA GPU"),
        ("cuda", True, False, "needs bitsandbytes"),
    ],
)
def test_4bit_refused_with_a_clear_message(device, cuda, bnb, msg):
    with pytest.raises(InputError, match=msg):
        plan_precision(
            quantize_4bit=True, dtype=None, device=device, cuda_available=cuda, bnb_available=bnb
        )


def test_cuda_device_without_cuda():
    with pytest.raises(InputError, match="CUDA is not available"):
        plan_precision(
            quantize_4bit=False,
            dtype=None,
            device="cuda",
            cuda_available=False,
            bnb_available=False,
        )


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


# --- local paths vs hub ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,local",
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", False),
        ("meta-llama/Llama-3.2-11B-Vision-Instruct", False),
        ("./models/tiny", True),
        ("../tiny-qwen2_5_vl", True),
        ("/abs/path/model", True),
        ("~/models/qwen", True),
        ("models\\tiny", True),  # a Windows separator
        ("C:/models/tiny", True),
        ("runs/a/model", True),  # more than owner/name
        ("owner/name/", True),  # a folder-like trailing slash
        (".hidden/model", True),
        ("owner/..", True),
        ("tiny-model", True),  # no owner: not a hub id we accept, so a local name
    ],
)
def test_looks_local(name, local):
    from emomerge.training.models.loading import looks_local

    assert looks_local(name) is local


def test_owner_naming_a_local_folder_makes_the_path_local(tmp_path):
    from emomerge.training.models.loading import looks_local

    (tmp_path / "models").mkdir()
    assert looks_local("models/tiny", relative_to=tmp_path) is True
    assert looks_local("elsewhere/tiny", relative_to=tmp_path) is False


@pytest.mark.parametrize(
    "name,msg",
    [
        (
            "./no-such-model",
            "model folder no-such-model not found (a hub id is exactly owner/name)",
        ),
        ("/no/such/model", "model folder /no/such/model not found"),
        ("runs/x/model", "model folder runs/x/model not found"),
        ("plainname", "model folder plainname not found"),
        ("owner/na..me", "not a local folder nor a hub id"),
    ],
)
def test_resolve_model_refuses_at_once(name, msg):
    from emomerge.training.models.loading import resolve_model

    with pytest.raises(InputError) as exc:
        resolve_model(name, where="cur.yaml: key 'base_model'")
    assert str(exc.value).startswith("cur.yaml: key 'base_model': ") and msg in str(exc.value)


def test_resolve_model_keeps_existing_paths_and_hub_ids(tmp_path, monkeypatch):
    from emomerge.training.models.loading import resolve_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    local = str(tmp_path / "m")
    assert resolve_model(local) == local  # unchanged (resume compares it with emomerge.json)
    assert resolve_model("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m") == local


def test_missing_local_model_is_one_line_before_any_hub_lookup(monkeypatch):
    """`load_vlm("./missing")` used to ask the hub (a minute of retries, then a traceback)."""
    import time

    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_hub)
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"^model folder \S*missing-model not found"):
        load_vlm("./missing-model", family="qwen2_5_vl")
    with pytest.raises(InputError, match=r"^model folder \S*missing-model not found"):
        load_vlm("./missing-model")  # family detection refuses it too
    assert time.perf_counter() - start < 2


def test_a_folder_without_config_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r": no config.json \(not a model checkpoint folder\)$"):
        load_vlm(tmp_path, family="llava")


def test_a_checkpoint_transformers_cannot_open_is_one_line(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llava"), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # config present, weights gone
    with pytest.raises(InputError) as exc:
        load_vlm(folder)
    assert str(exc.value).startswith(f"{folder}: cannot load the model (")
    assert "\n" not in str(exc.value)


# --- fitting big models: 4-bit / device_map decisions, without a GPU --------------------------

GB = 10**9


@pytest.mark.parametrize(
    "q4,dmap,weights,free,want",
    [
        # auto: the smallest change that fits (85 % of free memory for the weights)
        ("auto", None, 16 * GB, [80 * GB], (False, None)),  # 7B bf16 on one H100
        ("auto", None, 145 * GB, [80 * GB] * 4, (False, "auto")),  # 72B bf16 over 4 GPUs
        ("auto", None, 145 * GB, [80 * GB], (True, {"": "cuda"})),  # 72B 4-bit on one
        ("auto", None, 177 * GB, [40 * GB] * 2, (True, "auto")),  # 90B 4-bit over two
        ("auto", None, None, [80 * GB], (False, None)),  # size unknown: plain
        (True, None, 16 * GB, [80 * GB], (True, {"": "cuda"})),  # asked: as QLoRA
        (True, "auto", None, None, (True, "auto")),
        (False, "auto", None, None, (False, "auto")),
        (False, None, 500 * GB, [80 * GB], (False, None)),  # false is false
    ],
)
def test_loading_plan_on_cuda(q4, dmap, weights, free, want):
    plan = plan_loading(
        quantize_4bit=q4,
        device_map=dmap,
        device="cuda",
        cuda_available=True,
        bnb_available=True,
        weight_bytes=weights,
        weight_bytes_4bit=None if weights is None else weights * 27 // 100,
        free_bytes=free,
    )
    assert (plan.quantize_4bit, plan.device_map) == want and plan.reason


@pytest.mark.parametrize(
    "q4,dmap,device,cuda,bnb,match",
    [
        (
            True,
            None,
            "cpu",
            False,
            True,
            r"4-bit loading needs a CUDA GPU; this run is on cpu \(no CUDA on this machine\)",
        ),
        (True, None, "cpu", True, True, "4-bit loading needs a CUDA GPU; this run is on cpu$"),
        (False, "auto", "cpu", False, False, "device_map='auto' needs a CUDA GPU"),
        (True, None, "cuda", True, False, "4-bit loading needs bitsandbytes"),
        (False, "balanced", "cuda", True, True, "device_map must be null or 'auto'"),
        ("yes", None, "cuda", True, True, "quantize_4bit must be true, false or 'auto'"),
    ],
)
def test_loading_plan_refusals_are_one_line(q4, dmap, device, cuda, bnb, match):
    with pytest.raises(InputError, match=match) as exc:
        plan_loading(
            quantize_4bit=q4, device_map=dmap, device=device, cuda_available=cuda, bnb_available=bnb
        )
    assert "\n" not in str(exc.value)


def test_auto_that_cannot_fit_says_by_how_much():
    with pytest.raises(InputError, match=r"4-bit weights 50.0 GB, usable GPU memory 20.4 GB"):
        plan_loading(
            quantize_4bit="auto",
            device_map=None,
            device="cuda",
            cuda_available=True,
            bnb_available=True,
            weight_bytes=180 * GB,
            weight_bytes_4bit=50 * GB,
            free_bytes=[24 * GB, 24 * GB],
        )
    with pytest.raises(InputError, match="needs bitsandbytes"):
        plan_loading(
            quantize_4bit="auto",
            device_map=None,
            device="cuda",
            cuda_available=True,
            bnb_available=False,
            weight_bytes=180 * GB,
            free_bytes=[80 * GB],
        )


def test_machine_loading_reads_gpus_and_bitsandbytes(monkeypatch):
    """The facts the plan is made of, faked: two GPUs with 30 GB free, bitsandbytes present."""
    import importlib.util

    import torch

    from emomerge.training.models import loading as models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (30 * GB, 80 * GB))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(models, "checkpoint_bytes", lambda name: (40 * GB, 11 * GB))
    plan = models.machine_loading("auto", None, "cuda:1", "some/model")
    assert (plan.quantize_4bit, plan.device_map) == (False, "auto")  # 40 GB over 2 × 25.5
    monkeypatch.setattr(models, "checkpoint_bytes", lambda name: (60 * GB, 16 * GB))
    plan = models.machine_loading("auto", None, "cuda:1", "some/model")
    assert (plan.quantize_4bit, plan.device_map) == (True, {"": "cuda:1"})
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(InputError, match="needs bitsandbytes"):
        models.machine_loading(True, None, "cuda", "some/model")


def test_load_vlm_refuses_4bit_and_device_map_without_cuda(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="device_map='auto' needs a CUDA GPU"):
        load_vlm(tiny_model("llava"), device_map="auto")
    model, _, _ = load_vlm(tiny_model("llava"), quantize_4bit="auto")  # CPU: plain
    assert next(model.parameters()).dtype == torch.float32


def test_parameter_bytes_counts_the_tiny_model_exactly(tiny_model):
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = tiny_model("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    )
    bf16, nf4 = parameter_bytes(AutoConfig.from_pretrained(path))
    assert bf16 == 2 * n
    assert nf4 == int(2 * (n - linear) + NF4_BYTES * linear) and nf4 < bf16
