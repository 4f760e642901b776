"""The prompt LLaMA-Factory renders from our export equals the one emomerge trains on, per family.

LLaMA-Factory pins transformers <= 5.6 and peft <= 0.18.1, so it cannot live in this venv. Its
rendering rule is small and reimplemented here from the slot definitions below, copied from
LLaMA-Factory 0.9.5 (https://github.com/hiyouga/LLaMA-Factory, Apache-2.0; wheel
llamafactory-0.9.5-py3-none-any.whl): ``data/template.py`` (sha256 68f289bb…837dc) —
``register_template`` of qwen2_vl, qwen3_vl_nothink, mllama, llava, llava_next_mistral, pixtral,
``Template._encode`` and ``Llama2Template._encode`` — and ``data/mm_plugin.py`` (sha256
9a7db6d3…537dc) for what each plugin puts in place of "<image>" before token expansion.
tools/interop/llamafactory.sh checks the same parity with the installed LLaMA-Factory itself.

What no YAML key can change is pinned as an explicit difference (and listed in docs/INTEROP.md).
"""

from __future__ import annotations

import json

import pytest
import yaml
from emomerge.training.batching import answer_prefix, render_prompt
from emomerge.training.curriculum import parse_curriculum
from emomerge.training.export_llamafactory import export_llamafactory
from emomerge.training.families import FAMILIES
from emomerge.training.models import load_processor
from emomerge.training.stages import plan_stages

from .conftest import ALL_FAMILIES

BOS, EOS = {"bos_token"}, {"eos_token"}
# LLaMA-Factory 0.9.5 register_template(...) slots; "system" defaults to "{{content}}" (the
# default user formatter) and "assistant" to ["{{content}}", eos] when a template gives none.
LF_TEMPLATES = {
    "qwen2_vl": {
        "cls": "Template", "prefix": [], "default_system": "You are a helpful assistant.",
        "system": ["<|im_start|>system\n{{content}}<|im_end|>\n"],
        "user": ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
        "assistant": ["{{content}}<|im_end|>\n"],
        "image": "<|vision_start|><|image_pad|><|vision_end|>"},  # Qwen2VLPlugin
    "qwen3_vl_nothink": {
        "cls": "Template", "prefix": [], "default_system": "",
        "system": ["<|im_start|>system\n{{content}}<|im_end|>\n"],
        "user": ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"],
        "assistant": ["{{content}}<|im_end|>\n"],
        "image": "<|vision_start|><|image_pad|><|vision_end|>"},  # Qwen3VLPlugin
    "mllama": {
        "cls": "Template", "prefix": [BOS], "default_system": "",
        "system": ["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
        "user": [("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")],
        "assistant": ["{{content}}<|eot_id|>"], "image": "<|image|>"},
    "llava": {
        "cls": "Template", "prefix": [],
        "default_system": ("A chat between a curious user and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the user's "
                        "questions."),
        "system": ["{{content}}"], "user": ["USER: {{content}} ASSISTANT:"],
        "assistant": ["{{content}}", EOS], "image": "<image>"},
    "llava_next_mistral": {
        "cls": "Llama2Template", "prefix": [BOS], "default_system": "", "system": ["{{content}}\n\n"],
        "user": ["[INST] {{content}}[/INST]"], "assistant": [" {{content}}", EOS], "image": "<image>"},
    "pixtral": {
        "cls": "Llama2Template", "prefix": [BOS], "default_system": "", "system": ["{{content}}\n\n"],
        "user": ["[INST]{{content}}[/INST]"], "assistant": ["{{content}}", EOS], "image": "[IMG]"},
}

#: What LLaMA-Factory writes and emomerge does not, with no YAML key to drop it: the
#: llava_next_mistral template opens with the tokenizer's BOS (emomerge's LLaVA-NeXT prompt, like
#: llava-hf's template, has none and is encoded without special tokens); the Qwen templates end
#: the assistant turn with "<|im_end|>\n" (emomerge stops the answer at "<|im_end|>").
PROMPT_PREFIX = {"llava_next": "<s>"}
ANSWER_TAIL = {"qwen2_5_vl": "\n", "qwen3_vl": "\n"}


def _slots(slots: list, tokenizer, content: str = "") -> str:
    out = []
    for slot in slots:
        if slot == BOS:
            out.append(tokenizer.bos_token or "")
        elif slot == EOS:
            out.append(tokenizer.eos_token or "")
        else:
            out.append(slot.replace("{{content}}", content, 1))
    return "".join(out)


def lf_render(name: str, default_system: str | None, messages: list[dict], tokenizer,
              ) -> tuple[str, str]:
    """(prompt, response) of one user/assistant turn as LLaMA-Factory's ``_encode`` builds them,
    with "<image>" replaced as its plugin does before token expansion."""
    t = LF_TEMPLATES[name]
    system = t["default_system"] if default_system is None else default_system
    user = messages[0]["content"].replace("<image>", t["image"])
    prompt = _slots(t["prefix"], tokenizer)
    if t["cls"] == "Template":
        if system:
            prompt += _slots(t["system"], tokenizer, system)
        prompt += _slots(t["user"], tokenizer, user)
    else:  # Llama2Template: the system text goes inside the first user turn
        system_text = _slots(t["system"], tokenizer, system) if system else ""
        prompt += _slots(t["user"], tokenizer, system_text + user)
    return prompt, _slots(t["assistant"], tokenizer, messages[1]["content"])


def test_lf_renderer_reproduces_the_templates_defaults():
    """The reimplemented rule, pinned on a hand-written case: LLaMA-Factory's llava template with
    its own default system writes Vicuna's system line glued to "USER:" (why the export sets
    default_system: "")."""
    class Tok:
        bos_token, eos_token = "<s>", "</s>"

    prompt, response = lf_render("llava", None, [{"content": "<image>\nhi"},
                                                 {"content": "Joy"}], Tok())
    assert prompt == LF_TEMPLATES["llava"]["default_system"] + "USER: <image>\nhi ASSISTANT:"
    assert response == "Joy</s>"
    prompt, _ = lf_render("pixtral", "sys", [{"content": "hi<image>"}, {"content": "x"}], Tok())
    assert prompt == "<s>[INST]sys\n\nhi[IMG][/INST]"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_llamafactory_renders_our_prompt(tmp_path, tiny_model, synthetic, family):
    base = tiny_model(family)
    raw = {"base_model": str(base), "lineage": "continued", "seed": 3, "lora": {"r": 4},
           "stages": [{"name": "art", "dataset": "emoart", "path": str(synthetic["emoart"]),
                       "steps": 1},
                      {"name": "manga", "dataset": "mangavqa",
                       "path": str(synthetic["mangavqa"]), "steps": 1}]}
    out = export_llamafactory(raw, tmp_path / "lf", precision="fp32")
    processor = load_processor(base, family)
    spec = FAMILIES[family]
    plans = plan_stages(parse_curriculum(raw), tmp_path / "unused")
    checked = 0
    for i, plan in enumerate(plans):
        cfg = yaml.safe_load((out / f"{i + 1:02d}_{plan.stage.name}.yaml").read_text())
        assert cfg["template"] == spec.llamafactory_template
        records = (out / "data" / f"{plan.stage.name}.jsonl").read_text(encoding="utf-8")
        for sample, line in zip(plan.samples, records.splitlines(), strict=True):
            ours_prompt = render_prompt(processor, sample)
            ours_answer = (answer_prefix(processor, sample.messages) + sample.target
                           + spec.answer_suffix)
            lf_prompt, lf_answer = lf_render(cfg["template"], cfg.get("default_system"),
                                             json.loads(line)["messages"], processor.tokenizer)
            assert lf_prompt == PROMPT_PREFIX.get(family, "") + ours_prompt
            assert lf_answer == ours_answer + ANSWER_TAIL.get(family, "")
            checked += 1
    assert checked == sum(len(p.samples) for p in plans) > 10
    # the prompt carries the sample's image where the family puts it
    first = plans[0].samples[0]
    image = {"pixtral": "[INST][IMG]" + first.prompt_text[:8], "mllama": "<|image|>" + first.prompt_text[:8],
             "llava": "<image>\n" + first.prompt_text[:8]}
    if family in image:
        assert image[family] in render_prompt(processor, first)
