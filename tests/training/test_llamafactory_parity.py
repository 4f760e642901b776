"""The prompt LLaMA-Factory renders from our export equals the one emomerge trains on, per family.

LLaMA-Factory pins transformers <= 5.6 and peft <= 0.18.1, so it cannot live in this venv. Its
rendering rule is small and reimplemented here from the slot definitions below, copied from
LLaMA-Factory 0.9.5 (https://github.com/hiyouga/LLaMA-Factory, Apache-2.0; wheel
llamafactory-0.9.5-py3-none-any.whl): ``data/template.py`` (sha256 68f289bb…837dc) —
``register_template`` of qwen2_vl, qwen3_vl_nothink, mllama, llava, llava_next_mistral, pixtral,
``Template._encode`` and ``Llama2Template._encode`` — and ``data/mm_plugin.py`` (sha256
9a7db6d3…537dc) for what each plugin puts in place of "<image>" before token expansion.
tools/interop/llamafactory.sh checks the same parity with the installed LLaMA-Factory itself.

No difference is left (docs/INTEROP.md): prompt and answer strings are equal for every family,
and so are their token ids as LLaMA-Factory encodes them (a BOS slot as the id, each text slot
tokenized on its own) and as emomerge does (``batching.process_texts``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from emomerge.training.curriculum import parse_curriculum
from emomerge.training.export_llamafactory import LF_LAYOUTS, export_llamafactory
from emomerge.training.models.batching import answer_text, process_texts, render_prompt
from emomerge.training.models.families import FAMILIES
from emomerge.training.models.loading import load_processor
from emomerge.training.stages import plan_stages

from .conftest import ALL_FAMILIES

BOS, EOS = {"bos_token"}, {"eos_token"}
# LLaMA-Factory 0.9.5 register_template(...) slots; "system" defaults to "{{content}}" (the
# default user formatter) and "assistant" to ["{{content}}", eos] when a template gives none.
LF_TEMPLATES = {
    "qwen2_vl": {
        "cls": "Template",
        "prefix": [],
        "default_system": "You are a helpful assistant.",
        "system": ["<|im_start|>system\n{{content}}<|im_end|>\n"],
        "user": ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
        "assistant": ["{{content}}<|im_end|>\n"],
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
    },  # Qwen2VLPlugin
    "qwen3_vl_nothink": {
        "cls": "Template",
        "prefix": [],
        "default_system": "",
        "system": ["<|im_start|>system\n{{content}}<|im_end|>\n"],
        "user": ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
        "assistant": ["{{content}}<|im_end|>\n"],
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
    },  # Qwen3VLPlugin
    "mllama": {
        "cls": "Template",
        "prefix": [BOS],
        "default_system": "",
        "system": ["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
        "user": [
            (
                "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        ],
        "assistant": ["{{content}}<|eot_id|>"],
        "image": "<|image|>",
    },
    "llava": {
        "cls": "Template",
        "prefix": [],
        "default_system": (
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's "
            "questions."
        ),
        "system": ["{{content}}"],
        "user": ["USER: {{content}} ASSISTANT:"],
        "assistant": ["{{content}}", EOS],
        "image": "<image>",
    },
    "llava_next_mistral": {
        "cls": "Llama2Template",
        "prefix": [BOS],
        "default_system": "",
        "system": ["{{content}}\n\n"],
        "user": ["[INST] {{content}}[/INST]"],
        "assistant": [" {{content}}", EOS],
        "image": "<image>",
    },
    "pixtral": {
        "cls": "Llama2Template",
        "prefix": [BOS],
        "default_system": "",
        "system": ["{{content}}\n\n"],
        "user": ["[INST]{{content}}[/INST]"],
        "assistant": ["{{content}}", EOS],
        "image": "[IMG]",
    },
}

# No pinned differences: emomerge opens LLaVA-1.5 / LLaVA-NeXT prompts with the tokenizer's BOS
# (as their released processors and llava_next_mistral's prefix do; the llava export writes it as
# default_system) and trains Qwen answers through "<|im_end|>\n" (the Qwen assistant slot).


def _elements(slots: list, content: str = "") -> list:
    """The slots with the content filled in: BOS / EOS sets kept, text slots as strings."""
    return [
        slot if isinstance(slot, set) else slot.replace("{{content}}", content, 1) for slot in slots
    ]


def _slots(slots: list, tokenizer, content: str = "") -> str:
    out = []
    for slot in _elements(slots, content):
        if slot == BOS:
            out.append(tokenizer.bos_token or "")
        elif slot == EOS:
            out.append(tokenizer.eos_token or "")
        else:
            out.append(slot)
    return "".join(out)


def _slot_ids(elements: list, tokenizer) -> list[int]:
    """``Template._convert_elements_to_ids``: a BOS/EOS set is the token's id, every text
    element is tokenized on its own without special tokens."""
    ids: list[int] = []
    for elem in elements:
        if elem == BOS:
            ids.append(tokenizer.bos_token_id)
        elif elem == EOS:
            ids.append(tokenizer.eos_token_id)
        elif elem:
            ids += tokenizer.encode(elem, add_special_tokens=False)
    return ids


def lf_elements(
    name: str,
    default_system: str | None,
    messages: list[dict],
) -> tuple[list, list]:
    """The prompt's and the response's elements of one user/assistant turn as LLaMA-Factory's
    ``_encode`` builds them, with "<image>" replaced as its plugin does before token expansion."""
    t = LF_TEMPLATES[name]
    system = t["default_system"] if default_system is None else default_system
    user = messages[0]["content"].replace("<image>", t["image"])
    prompt = _elements(t["prefix"])
    if t["cls"] == "Template":
        if system:
            prompt += _elements(t["system"], system)
        prompt += _elements(t["user"], user)
    else:  # Llama2Template: the system text goes inside the first user turn
        system_text = _slots(t["system"], None, system) if system else ""
        prompt += _elements(t["user"], system_text + user)
    return prompt, _elements(t["assistant"], messages[1]["content"])


def lf_render(
    name: str,
    default_system: str | None,
    messages: list[dict],
    tokenizer,
) -> tuple[str, str]:
    """(prompt, response) strings of one user/assistant turn as LLaMA-Factory renders them."""
    prompt, response = lf_elements(name, default_system, messages)
    return _slots(prompt, tokenizer), _slots(response, tokenizer)


def test_lf_renderer_reproduces_the_templates_defaults():
    """The reimplemented rule, pinned on a hand-written case: LLaMA-Factory's llava template with
    its own default system writes Vicuna's system line glued to "USER:" (why the export sets
    default_system: "")."""

    class Tok:
        bos_token, eos_token = "<s>", "</s>"

    prompt, response = lf_render(
        "llava", None, [{"content": "<image>\nhi"}, {"content": "Joy"}], Tok()
    )
    assert prompt == LF_TEMPLATES["llava"]["default_system"] + "USER: <image>\nhi ASSISTANT:"
    assert response == "Joy</s>"
    prompt, _ = lf_render("pixtral", "sys", [{"content": "hi<image>"}, {"content": "x"}], Tok())
    assert prompt == "<s>[INST]sys\n\nhi[IMG][/INST]"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_llamafactory_renders_our_prompt(tmp_path, tiny_model, synthetic, family):
    base = tiny_model(family)
    raw = {
        "base_model": str(base),
        "lineage": "continued",
        "seed": 3,
        "lora": {"r": 4},
        "stages": [
            {"name": "art", "dataset": "emoart", "path": str(synthetic["emoart"]), "steps": 1},
            {
                "name": "manga",
                "dataset": "mangavqa",
                "path": str(synthetic["mangavqa"]),
                "steps": 1,
            },
        ],
    }
    out = export_llamafactory(raw, tmp_path / "lf", precision="fp32")
    processor = load_processor(base, family)
    tok = processor.tokenizer
    spec = FAMILIES[family]
    plans = plan_stages(parse_curriculum(raw), tmp_path / "unused")
    checked = 0
    for i, plan in enumerate(plans):
        cfg = yaml.safe_load((out / f"{i + 1:02d}_{plan.stage.name}.yaml").read_text())
        assert cfg["template"] == spec.llamafactory_template
        records = (out / "data" / f"{plan.stage.name}.jsonl").read_text(encoding="utf-8")
        for sample, line in zip(plan.samples, records.splitlines(), strict=True):
            ours_prompt = render_prompt(processor, sample, family)
            ours_answer = answer_text(processor, family, sample)
            messages = json.loads(line)["messages"]
            lf_prompt, lf_answer = lf_render(
                cfg["template"], cfg.get("default_system"), messages, tok
            )
            assert lf_prompt == ours_prompt
            assert lf_answer == ours_answer
            checked += 1
        # token ids too, on text-only turns (the processors expand image tokens, LLaMA-Factory's
        # plugin does the same from the same placeholder): its elements encoded one by one,
        # ours as training encodes prompt and prompt + answer
        sample = plan.samples[0]
        text_only = dataclasses.replace(
            sample,
            images=[],
            messages=[{"role": "user", "content": [{"type": "text", "text": sample.prompt_text}]}],
        )
        layout = LF_LAYOUTS[family]
        messages = json.loads(records.splitlines()[0])["messages"]
        messages[0]["content"] = messages[0]["content"].replace("<image>" + layout.image_sep, "")
        prompt_el, answer_el = lf_elements(cfg["template"], cfg.get("default_system"), messages)
        ours_prompt = render_prompt(processor, text_only, family)
        tok.padding_side = "right"
        p_ids = process_texts(processor, family, [ours_prompt], [[]])["input_ids"][0].tolist()
        full = process_texts(
            processor, family, [ours_prompt + answer_text(processor, family, text_only)], [[]]
        )["input_ids"][0].tolist()
        assert p_ids == _slot_ids(prompt_el, tok)
        assert full == p_ids + _slot_ids(answer_el, tok)
    assert checked == sum(len(p.samples) for p in plans) > 10
    # the prompt carries the sample's image where the family puts it
    first = plans[0].samples[0]
    image = {
        "pixtral": "[INST][IMG]" + first.prompt_text[:8],
        "mllama": "<|image|>" + first.prompt_text[:8],
        "llava": "<image>\n" + first.prompt_text[:8],
    }
    if family in image:
        assert image[family] in render_prompt(processor, first, family)
