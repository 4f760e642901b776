"""Export a curriculum for LLaMA-Factory: sharegpt JSONL, ``dataset_info.json``, one YAML per stage.

Layout of the export folder (every path inside it is relative: the folder can be moved)::

    data/<stage>.jsonl          {"messages": [...], "images": [...]} — "<image>" per image, placed
                                where the family's prompt puts it; image paths relative to data/
    data/dataset_info.json      entries "emomerge_<stage>" (sharegpt, openai-style tags)
    data/images/<stage>/...     images that only exist in memory (parquet bytes, placeholders)
    NN_<stage>.yaml             llamafactory-cli train config (paths relative to this folder)
    adapters/<stage>/emomerge.json  the stage's lineage, written up front (LLaMA-Factory leaves
                                files it does not know in its output_dir); run.sh fills
                                lineage.parent_sha256 once the parent stage is trained
    run.sh                      the stages in order; finished stages are skipped

Lineage maps onto LLaMA-Factory's adapter options: ``continued`` resumes the previous stage's
adapter (``adapter_name_or_path: <prev>``, ``create_new_adapter: false``); ``stacked`` merges all
previous adapters into the base and starts a fresh one (``adapter_name_or_path: <all previous>``,
``create_new_adapter: true``) — the same order emomerge folds them in. LLaMA-Factory refuses the
stacked form on a 4-bit base, so stacked + ``quantize_4bit`` is refused here.

The prompt and answer LLaMA-Factory renders equal emomerge's for every family
(``tests/training/test_llamafactory_parity.py``, ``docs/INTEROP.md``). LLaVA-1.5 is the one
template that needs more than a layout: LLaMA-Factory's ``llava`` has no BOS slot where the
released processor (and emomerge) open with ``<s>``, so the export writes the tokenizer's BOS as
``default_system``, which that template's system slot (``{{content}}``) puts first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emomerge import __version__
from emomerge.merging.atomic import atomic_folder
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import LINEAGE_FILE, BaseIdentity, Lineage, StageMetadata

from .curriculum import Curriculum
from .models.families import IMAGE_CAPS, detect_family, get_family
from .models.fingerprint import recorded_base_hash
from .stages import ADAPTER_FILE, StagePlan, plan_stages
from .trainer import _as_curriculum

LF_IMAGE = "<image>"
TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}
LM_PROJ = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
#: ``image_max_pixels`` that never shrinks an image: the families whose architecture fixes the
#: input (LLaVA-1.5's crop, Mllama's tiles, LLaVA-NeXT's grid) get the original image, as in
#: emomerge, instead of a second resize before their processor's.
NO_PRE_RESIZE = 2**40


@dataclass(frozen=True)
class LFLayout:
    """How a family's sample is written so LLaMA-Factory's template renders emomerge's prompt.

    Read off LLaMA-Factory 0.9.5's ``data/template.py`` slots and ``data/mm_plugin.py``
    placeholders (the slots are copied in ``tests/training/test_llamafactory_parity.py``).
    """

    #: written as ``default_system`` (overrides the template's own; "" = no system turn)
    default_system: str
    #: write the tokenizer's BOS as ``default_system`` instead: the template has no BOS slot but a
    #: system slot that is only ``{{content}}`` before the user turn (LLaVA-1.5's ``llava``)
    bos_as_system: bool = False
    #: written after each "<image>" (LLaVA's templates: "<image>\n" then the text)
    image_sep: str = ""
    #: appended to the user text (LLaVA-NeXT: ours "text [/INST]", the slot "{{content}}[/INST]")
    user_tail: str = ""
    #: prepended to the answer (LLaVA-1.5: ours "ASSISTANT: Joy", the slot "... ASSISTANT:")
    answer_prefix: str = ""


LF_LAYOUTS: dict[str, LFLayout] = {
    # qwen2_vl's own default system is the Qwen2.5-VL template's: written anyway, pinned
    "qwen2_5_vl": LFLayout("You are a helpful assistant."),
    "qwen3_vl": LFLayout(""),
    "mllama": LFLayout(""),
    # llava's default is Vicuna's "A chat between a curious user ..."; llava-hf's has none, and
    # the released processor opens the prompt with <s>, which llava's slots lack
    "llava": LFLayout("", image_sep="\n", answer_prefix=" ", bos_as_system=True),
    "llava_next": LFLayout("", image_sep="\n", user_tail=" "),
    "pixtral": LFLayout(""),
}


def lf_default_system(base: str, family: str) -> str:
    """``default_system`` of ``family``'s export: the layout's, or the base tokenizer's BOS
    (``LFLayout.bos_as_system``: what emomerge's prompt opens with, ``batching.prompt_bos``)."""
    layout = LF_LAYOUTS[family]
    if not layout.bos_as_system:
        return layout.default_system
    from transformers import AutoTokenizer

    try:
        bos = AutoTokenizer.from_pretrained(str(base)).bos_token
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{base}: cannot load the tokenizer ({first})") from exc
    if not bos:
        raise InputError(
            f"{base}: the tokenizer has no BOS token, which {family} prompts open with"
        )
    return str(bos)


def _image_paths(plan: StagePlan, sample_idx: int, images: list[Any], tmp: Path) -> list[str]:
    """Image paths as LLaMA-Factory reads them: relative to ``data/`` (its ``media_dir`` defaults
    to ``dataset_dir``) for images the export writes; absolute for the dataset's own files, which
    live outside the export."""
    out = []
    for k, img in enumerate(images):
        if isinstance(img, str):
            out.append(str(Path(img).resolve()))
            continue
        rel = Path("images") / plan.stage.name / f"{sample_idx:06d}_{k}.png"
        (tmp / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(tmp / "data" / rel)
        out.append(rel.as_posix())
    return out


def sharegpt_record(plan: StagePlan, idx: int, tmp: Path, family: str) -> dict[str, Any]:
    """One sample as LLaMA-Factory's openai-style sharegpt record, laid out for ``family``."""
    s = plan.samples[idx]
    layout = LF_LAYOUTS[family]
    images = _image_paths(plan, idx, s.images, tmp)
    if s.prompt_text.count(LF_IMAGE):
        raise InputError(f"sample {s.id}: prompt contains the literal '{LF_IMAGE}' token")
    # our samples put the images before the text (Sample.messages), as every template renders
    user = (LF_IMAGE + layout.image_sep) * len(images) + s.prompt_text + layout.user_tail
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": layout.answer_prefix + s.target},
        ],
        "images": images,
    }


def export_precision(cur: Curriculum, *, cuda: bool, bf16_supported: bool) -> tuple[str, str]:
    """``("bf16" | "fp16" | "fp32", why)`` for LLaMA-Factory's mixed-precision flags.

    ``train.dtype`` wins; unset, it follows emomerge's own rule (``models.plan_precision``) on the
    exporting machine: bf16 on a CUDA GPU that supports it, fp16 on one that does not, fp32 on
    CPU — where LLaMA-Factory refuses ``bf16: true``. 4-bit QLoRA needs CUDA whatever machine
    exports it: bf16 compute, as emomerge's QLoRA.
    """
    named = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    if cur.train.dtype is not None:
        return named[cur.train.dtype], f"train.dtype: {cur.train.dtype}"
    if cur.train.quantize_4bit:
        return "bf16", "train.quantize_4bit: QLoRA runs on CUDA with bf16 compute"
    if cuda and bf16_supported:
        return "bf16", "train.dtype unset; the exporting machine's CUDA GPU supports bf16"
    if cuda:
        return "fp16", "train.dtype unset; the exporting machine's CUDA GPU has no bf16"
    return "fp32", "train.dtype unset; no CUDA on the exporting machine"


def _machine_precision(cur: Curriculum) -> tuple[str, str]:
    import torch

    cuda = torch.cuda.is_available()
    return export_precision(cur, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


def image_pixels(family: str, image: dict[str, Any], own: dict[str, Any]) -> dict[str, int]:
    """``image_max_pixels`` / ``image_min_pixels`` for the resolved cap ``image``
    (:func:`~.models.loading.image_cap_record`); ``own`` is the checkpoint's record without any cap.

    LLaMA-Factory shrinks every image to ``image_max_pixels`` (default 768 x 768) before the
    processor sees it and enlarges it to ``image_min_pixels`` (default 32 x 32). Qwen: the cap
    itself (the processor's ``min_pixels`` below). Pixtral: the processor keeps the checkpoint's
    longest edge, so the cap is the checkpoint's one (no pre-resize) or, for an explicit other
    edge, its square area. The rest have a size their architecture fixes: no pre-resize.
    """
    kind = IMAGE_CAPS[family].kind
    settings = image["settings"]
    if kind == "pixels":
        return {
            "image_max_pixels": settings["max_pixels"],
            "image_min_pixels": settings["min_pixels"],
        }
    if kind == "pinpoints" and settings != own["settings"]:
        raise InputError(
            "train.max_pixels: LLaMA-Factory cannot drop LLaVA-NeXT grid pinpoints "
            f"(kept {settings['image_grid_pinpoints']}); drop train.max_pixels for "
            "the export"
        )
    if kind == "longest_edge" and settings != own["settings"]:
        return {"image_max_pixels": settings["longest_edge"] ** 2, "image_min_pixels": 1}
    return {"image_max_pixels": NO_PRE_RESIZE, "image_min_pixels": 1}


def stage_yaml(
    cur: Curriculum,
    plan: StagePlan,
    family: str,
    base: str,
    previous: list[str],
    precision: str,
    pixels: dict[str, int],
    default_system: str | None = None,
) -> dict[str, Any]:
    """The llamafactory-cli train config of one stage (paths relative to the export folder);
    ``default_system`` None: the family layout's (:func:`lf_default_system` resolves a BOS)."""
    t, lora, stage = cur.train, cur.lora, plan.stage
    cfg: dict[str, Any] = {
        "model_name_or_path": base,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # With freeze_vision_tower LLaMA-Factory rewrites these names into a regex that skips the
        # vision tower, so LoRA lands on the language model only (as emomerge's family regex).
        "lora_target": LM_PROJ,
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True,
        "use_rslora": lora.use_rslora,
        "dataset": f"emomerge_{stage.name}",
        "dataset_dir": "data",
        "template": get_family(family).llamafactory_template,
        "default_system": (
            LF_LAYOUTS[family].default_system if default_system is None else default_system
        ),
        **pixels,
        "cutoff_len": 4096,
        "output_dir": f"adapters/{stage.name}",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": stage.lr or t.lr,
        "lr_scheduler_type": t.scheduler,
        "weight_decay": t.weight_decay,
        "seed": cur.seed + plan.index,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
    }
    if t.max_grad_norm:
        cfg["max_grad_norm"] = t.max_grad_norm
    if stage.steps is not None:
        cfg["max_steps"] = total = stage.steps
    else:
        cfg["num_train_epochs"] = float(stage.epochs)
        # Steps on one device; more devices make fewer steps, so warmup only gets longer.
        total = math.ceil(len(plan.samples) / (t.batch_size * t.grad_accum) * stage.epochs)
    if t.warmup_ratio:
        # An integer warmup_steps reads the same under transformers 4.x and 5.x (5.x dropped
        # warmup_ratio and overwrite_output_dir, which LLaMA-Factory's examples still show).
        cfg["warmup_steps"] = max(1, int(t.warmup_ratio * total))
    if t.quantize_4bit:
        cfg["quantization_bit"] = 4
    if previous:
        if cur.lineage == "continued":
            cfg["adapter_name_or_path"] = previous[-1]
            cfg["create_new_adapter"] = False
        else:
            cfg["adapter_name_or_path"] = ",".join(previous)
            cfg["create_new_adapter"] = True
    return cfg


def _lineage(
    cur: Curriculum,
    plan: StagePlan,
    prev: StagePlan | None,
    base: str,
    family: str,
    base_sha: str | None,
    image: dict[str, Any],
    cfg: dict[str, Any],
    precision: str,
) -> StageMetadata:
    """The stage's ``emomerge.json`` as far as it is known before training: the fields training
    writes, but ``steps``/losses (LLaMA-Factory's ``trainer_state.json`` has them) and
    ``lineage.parent_sha256``, which run.sh fills once the parent is trained. No
    ``settings_sha256``: that fingerprints emomerge's own trainer for resuming, not this one."""
    train = {**cur.train.model_dump(), "lr": plan.stage.lr or cur.train.lr}
    return StageMetadata(
        emomerge_version=__version__,
        stage=plan.stage.name,
        stage_index=plan.index,
        lineage=Lineage(mode=cur.lineage, parent=f"../{prev.stage.name}" if prev else None),
        base=BaseIdentity(name_or_path=base, hash=base_sha, family=family),
        dataset=plan.dataset_record(cur),
        seed=cur.seed,
        lora=cur.lora.model_dump(),
        train=train,
        image=image,
        trained_by="llamafactory",
        llamafactory={
            "template": cfg["template"],
            "default_system": cfg["default_system"],
            "precision": precision,
            "image_max_pixels": cfg["image_max_pixels"],
            "image_min_pixels": cfg["image_min_pixels"],
        },
    )


#: run.sh's helper: records the parent's adapter sha256 in a stage's emomerge.json (stdlib only:
#: it runs in LLaMA-Factory's environment, which need not have emomerge).
FILL_PARENT = """\
# usage: python lineage/fill_parent_sha256.py adapters/<stage>
# Written by emomerge export-llamafactory: sets lineage.parent_sha256 in the stage's
# emomerge.json to the sha256 of its parent's adapter_model.safetensors (parent trained first).
import hashlib, json, os, sys

stage = sys.argv[1]
path = os.path.join(stage, "emomerge.json")
meta = json.load(open(path, encoding="utf-8"))
parent = os.path.normpath(os.path.join(stage, meta["lineage"]["parent"]))
digest = hashlib.sha256()
with open(os.path.join(parent, "adapter_model.safetensors"), "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
meta["lineage"]["parent_sha256"] = digest.hexdigest()
tmp = path + ".tmp"
with open(tmp, "w", encoding="utf-8") as fh:
    fh.write(json.dumps(meta, indent=2) + "\\n")
os.replace(tmp, path)
"""


def run_script(names: list[str], yaml_names: list[str]) -> str:
    """run.sh: trains the stages in order from the export folder, skipping finished ones.

    A stage is finished when LLaMA-Factory wrote ``train_results.json`` (after the adapter).
    ``save_strategy: no`` leaves no checkpoint to resume, so an interrupted stage restarts: its
    partial weights are removed first, because LLaMA-Factory refuses an output_dir holding
    adapter weights and transformers 5 has no ``overwrite_output_dir`` any more.
    """
    lines = [
        "#!/bin/sh",
        "# usage: sh run.sh   (from anywhere; LLaMA-Factory's environment active)",
        "set -eu",
        'cd "$(dirname "$0")"',
        "PYTHON=${PYTHON:-python}",
        "",
    ]
    for i, (name, yaml_name) in enumerate(zip(names, yaml_names)):
        out = f"adapters/{name}"
        lines += [
            f"if [ -f {out}/{ADAPTER_FILE} ] && [ -f {out}/train_results.json ]; then",
            f'    echo "stage {name}: finished, skipped"',
            "else",
            f"    rm -f {out}/{ADAPTER_FILE} {out}/adapter_model.bin {out}/adapter_config.json",
        ]
        if i:
            lines.append(f'    "$PYTHON" lineage/fill_parent_sha256.py {out}')
        lines += [f"    llamafactory-cli train {yaml_name}", "fi"]
    return "\n".join(lines) + "\n"


def _yaml_header(
    yaml_name: str,
    plan: StagePlan,
    n: int,
    cur: Curriculum,
    precision: str,
    why: str,
    image: dict[str, Any],
) -> str:
    return (
        f"# llamafactory-cli train {yaml_name}   (from the export folder; run.sh runs all)\n"
        f"# stage {plan.index + 1}/{n} of an emomerge curriculum (lineage: {cur.lineage}); "
        f"written by emomerge export-llamafactory {__version__}\n"
        f"# precision: {precision} ({why}); bf16 needs a CUDA GPU that supports it\n"
        f"# images: emomerge's cap resolved to {image['settings']} "
        f"({image['source']}); image_max_pixels/image_min_pixels bound LLaMA-Factory's "
        f"resize before the processor\n"
    )


def _bos_note(family: str, default_system: str) -> str:
    if not LF_LAYOUTS[family].bos_as_system:
        return ""
    return (
        f"# default_system {default_system!r} is the tokenizer's BOS, not a system prompt: "
        f"the {get_family(family).llamafactory_template} template has no BOS slot, and the "
        "released processor (and emomerge) open the prompt with it (docs/INTEROP.md)\n"
    )


def export_llamafactory(
    curriculum_yaml_or_obj: Curriculum | dict | str | Path,
    out_dir: str | Path,
    *,
    precision: str | None = None,
) -> Path:
    """Write the LLaMA-Factory export of a curriculum into ``out_dir`` (created atomically).

    ``precision`` ("bf16", "fp16", "fp32") overrides :func:`export_precision`'s choice.
    """
    from .models.loading import image_cap_record

    cur = _as_curriculum(curriculum_yaml_or_obj)
    if precision is not None and precision not in ("bf16", "fp16", "fp32"):
        raise InputError(f"--precision must be bf16, fp16 or fp32, got {precision!r}")
    if cur.lineage == "stacked" and cur.train.quantize_4bit and len(cur.stages) > 1:
        raise InputError(
            "lineage 'stacked' with train.quantize_4bit cannot be exported: "
            'LLaMA-Factory refuses a new adapter on a 4-bit base ("Cannot create new '
            'adapter upon a quantized model"); use lineage: continued, or drop '
            "quantize_4bit"
        )
    final = Path(out_dir).resolve()
    if final.exists() and any(final.iterdir()):
        raise InputError(f"{final}: already exists and is not empty")
    base = cur.resolved_base()
    family = cur.family or detect_family(base)
    where = f"{cur.source}: key 'train.max_pixels'"
    image = image_cap_record(base, family, cur.train.max_pixels, where=where)
    pixels = image_pixels(family, image, image_cap_record(base, family, None, where=where))
    if precision is None:
        precision, why = _machine_precision(cur)
    else:
        why = "--precision"
    default_system = lf_default_system(base, family)
    plans = plan_stages(cur, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as tmp:  # an empty folder at final is replaced
        (tmp / "data").mkdir()
        (tmp / "lineage").mkdir()
        info, previous, yaml_names = {}, [], []
        base_sha = recorded_base_hash(base)
        for plan in plans:
            name = plan.stage.name
            with (tmp / "data" / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for i in range(len(plan.samples)):
                    fh.write(
                        json.dumps(sharegpt_record(plan, i, tmp, family), ensure_ascii=False) + "\n"
                    )
            info[f"emomerge_{name}"] = {
                "file_name": f"{name}.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"},
                "tags": TAGS,
            }
            cfg = stage_yaml(cur, plan, family, base, previous, precision, pixels, default_system)
            yaml_name = f"{plan.index + 1:02d}_{name}.yaml"
            header = _yaml_header(
                yaml_name, plan, len(plans), cur, precision, why, image
            ) + _bos_note(family, default_system)
            (tmp / yaml_name).write_text(
                header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
            )
            prev = plans[plan.index - 1] if plan.index else None
            meta = _lineage(cur, plan, prev, base, family, base_sha, image, cfg, precision)
            (tmp / "adapters" / name).mkdir(parents=True)
            (tmp / "adapters" / name / LINEAGE_FILE).write_text(
                json.dumps(meta.model_dump(mode="json"), indent=2) + "\n"
            )
            previous.append(cfg["output_dir"])
            yaml_names.append(yaml_name)
        (tmp / "data" / "dataset_info.json").write_text(
            json.dumps(info, indent=2, ensure_ascii=False) + "\n"
        )
        (tmp / "lineage" / "fill_parent_sha256.py").write_text(FILL_PARENT)
        (tmp / "run.sh").write_text(run_script([p.stage.name for p in plans], yaml_names))
        # executable: atomic_folder publishes it 0o777 & ~umask (readable = executable)
        (tmp / "run.sh").chmod(0o700)
    return final
