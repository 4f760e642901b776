"""Export a curriculum for LLaMA-Factory: sharegpt JSONL, ``dataset_info.json``, one YAML per stage.

Layout of the export folder::

    data/<stage>.jsonl          {"messages": [...], "images": [...]} — one "<image>" per image
    data/dataset_info.json      entries "emomerge_<stage>" (sharegpt, openai-style tags)
    data/images/<stage>/...     images that only exist in memory (parquet bytes, placeholders)
    NN_<stage>.yaml             llamafactory-cli train config
    lineage/<stage>.json        the stage's emomerge.json, copied next to the adapter afterwards
    run.sh                      the commands, in order

Lineage maps onto LLaMA-Factory's adapter options: ``continued`` resumes the previous stage's
adapter (``adapter_name_or_path: <prev>``, ``create_new_adapter: false``); ``stacked`` merges all
previous adapters into the base and starts a fresh one (``adapter_name_or_path: <all previous>``,
``create_new_adapter: true``) — the same order emomerge folds them in.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import BaseIdentity, Lineage, StageMetadata

from emomerge import __version__

from .curriculum import Curriculum
from .families import detect_family, get_family
from .fsutil import publish_permissions
from .stages import StagePlan, base_hash, plan_stages
from .trainer import _as_curriculum

LF_IMAGE = "<image>"
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
        "assistant_tag": "assistant", "system_tag": "system"}
LM_PROJ = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _image_paths(plan: StagePlan, sample_idx: int, images: list[Any], tmp: Path,
                 final: Path) -> list[str]:
    out = []
    for k, img in enumerate(images):
        if isinstance(img, str):
            out.append(str(Path(img).resolve()))
            continue
        rel = Path("data") / "images" / plan.stage.name / f"{sample_idx:06d}_{k}.png"
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(tmp / rel)
        out.append(str(final / rel))
    return out


def sharegpt_record(plan: StagePlan, idx: int, tmp: Path, final: Path) -> dict[str, Any]:
    """One sample as LLaMA-Factory's openai-style sharegpt record."""
    s = plan.samples[idx]
    images = _image_paths(plan, idx, s.images, tmp, final)
    if s.prompt_text.count(LF_IMAGE):
        raise InputError(f"sample {s.id}: prompt contains the literal '{LF_IMAGE}' token")
    return {"messages": [{"role": "user", "content": LF_IMAGE * len(images) + s.prompt_text},
                         {"role": "assistant", "content": s.target}],
            "images": images}


def stage_yaml(cur: Curriculum, plan: StagePlan, family: str, base: str, final: Path,
               previous: list[str]) -> dict[str, Any]:
    """The llamafactory-cli train config of one stage."""
    t, lora, stage = cur.train, cur.lora, plan.stage
    cfg: dict[str, Any] = {
        "model_name_or_path": base, "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        # With freeze_vision_tower LLaMA-Factory rewrites these names into a regex that skips the
        # vision tower, so LoRA lands on the language model only (as emomerge's family regex).
        "lora_target": LM_PROJ, "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True, "use_rslora": lora.use_rslora,
        "dataset": f"emomerge_{stage.name}", "dataset_dir": str(final / "data"),
        "template": get_family(family).llamafactory_template, "cutoff_len": 4096,
        "output_dir": str(final / "adapters" / stage.name),
        "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum, "learning_rate": stage.lr or t.lr,
        "lr_scheduler_type": t.scheduler,
        "weight_decay": t.weight_decay, "seed": cur.seed + plan.index, "bf16": True,
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


def _lineage(cur: Curriculum, plan: StagePlan, prev: StagePlan | None, base: str, family: str,
             base_sha: str | None) -> StageMetadata:
    return StageMetadata(
        emomerge_version=__version__, stage=plan.stage.name, stage_index=plan.index,
        lineage=Lineage(mode=cur.lineage, parent=f"../{prev.stage.name}" if prev else None),
        base=BaseIdentity(name_or_path=base, hash=base_sha, family=family),
        dataset=plan.dataset_record(cur), seed=cur.seed, trained_by="llamafactory",
    )


def export_llamafactory(curriculum_yaml_or_obj: Curriculum | dict | str | Path,
                        out_dir: str | Path) -> Path:
    """Write the LLaMA-Factory export of a curriculum into ``out_dir`` (created atomically)."""
    cur = _as_curriculum(curriculum_yaml_or_obj)
    final = Path(out_dir).resolve()
    if final.exists() and any(final.iterdir()):
        raise InputError(f"{final}: already exists and is not empty")
    base = cur.resolved_base()
    family = cur.family or detect_family(base)
    plans = plan_stages(cur, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        (tmp / "data").mkdir()
        (tmp / "lineage").mkdir()
        info, previous, commands = {}, [], ["#!/bin/sh", "set -e", f"cd {final}"]
        base_sha = base_hash(base)
        for plan in plans:
            name = plan.stage.name
            with (tmp / "data" / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for i in range(len(plan.samples)):
                    fh.write(json.dumps(sharegpt_record(plan, i, tmp, final),
                                        ensure_ascii=False) + "\n")
            info[f"emomerge_{name}"] = {"file_name": f"{name}.jsonl", "formatting": "sharegpt",
                                        "columns": {"messages": "messages", "images": "images"},
                                        "tags": TAGS}
            cfg = stage_yaml(cur, plan, family, base, final, previous)
            yaml_name = f"{plan.index + 1:02d}_{name}.yaml"
            header = (f"# llamafactory-cli train {yaml_name}\n"
                      f"# stage {plan.index + 1}/{len(plans)} of an emomerge curriculum "
                      f"(lineage: {cur.lineage}); written by emomerge export-llamafactory\n")
            (tmp / yaml_name).write_text(header + yaml.safe_dump(cfg, sort_keys=False,
                                                                 allow_unicode=True))
            prev = plans[plan.index - 1] if plan.index else None
            meta = _lineage(cur, plan, prev, base, family, base_sha)
            (tmp / "lineage" / f"{name}.json").write_text(
                json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
            commands += [f"llamafactory-cli train {yaml_name}",
                         f"cp lineage/{name}.json adapters/{name}/emomerge.json"]
            previous.append(cfg["output_dir"])
        (tmp / "data" / "dataset_info.json").write_text(
            json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        (tmp / "run.sh").write_text("\n".join(commands) + "\n")
        publish_permissions(tmp)
        if final.exists():
            final.rmdir()
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
