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


# --- local paths vs hub ids ----------------------------------------------------------------

@pytest.mark.parametrize("name,local", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", False),
    ("meta-llama/Llama-3.2-11B-Vision-Instruct", False),
    ("./models/tiny", True),
    ("../tiny-qwen2_5_vl", True),
    ("/abs/path/model", True),
    ("~/models/qwen", True),
    ("models\\tiny", True),          # a Windows separator
    ("C:/models/tiny", True),
    ("runs/a/model", True),          # more than owner/name
    ("owner/name/", True),           # a folder-like trailing slash
    (".hidden/model", True),
    ("owner/..", True),
    ("tiny-model", True),            # no owner: not a hub id we accept, so a local name
])
def test_looks_local(name, local):
    from emomerge.training.models import looks_local

    assert looks_local(name) is local


def test_owner_naming_a_local_folder_makes_the_path_local(tmp_path):
    from emomerge.training.models import looks_local

    (tmp_path / "models").mkdir()
    assert looks_local("models/tiny", relative_to=tmp_path) is True
    assert looks_local("elsewhere/tiny", relative_to=tmp_path) is False


@pytest.mark.parametrize("name,msg", [
    ("./no-such-model", "model folder no-such-model not found (a hub id is exactly owner/name)"),
    ("/no/such/model", "model folder /no/such/model not found"),
    ("runs/x/model", "model folder runs/x/model not found"),
    ("plainname", "model folder plainname not found"),
    ("owner/na..me", "not a local folder nor a hub id"),
])
def test_resolve_model_refuses_at_once(name, msg):
    from emomerge.training.models import resolve_model

    with pytest.raises(InputError) as exc:
        resolve_model(name, where="cur.yaml: key 'base_model'")
    assert str(exc.value).startswith("cur.yaml: key 'base_model': ") and msg in str(exc.value)


def test_resolve_model_keeps_existing_paths_and_hub_ids(tmp_path, monkeypatch):
    from emomerge.training.models import resolve_model

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
