"""Sequential LoRA training over a curriculum: one PEFT adapter per stage, resumable, accelerate-ready.

Lineage modes (docs/DESIGN.md, Words: "Lineage"):
- ``continued``: stage k loads stage k-1's adapter as trainable and keeps training it, so every
  adapter's ΔW is cumulative from the base.
- ``stacked``: stages 0..k-1 are folded into the base (PEFT ``merge_and_unload``), then a fresh
  LoRA is trained on top, so stage k's ΔW is relative to that folded model.

Every stage rebuilds its starting model from the base and the finished adapters on disk — the same
path for a fresh run and for a resumed one, so a restarted run yields the adapters an
uninterrupted run would. A stage folder is written to a temporary sibling and renamed into place
when complete, which is what makes "skip finished stages" safe.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from emomerge.merging.atomic import atomic_folder, sweep_stale
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import write_stage_metadata
from emomerge.merging.progress import phase

from .curriculum import Curriculum, load_curriculum, parse_curriculum
from .data import samples_sha256
from .models.batching import MAX_BAD_IMAGE_SHARE, check_images, encode_batch
from .models.families import detect_family, get_family
from .models.fingerprint import recorded_base_hash
from .models.loading import image_cap_record, load_vlm, machine_precision, resolve_model
from .stages import StagePlan, check_resumable, is_complete, plan_stages, stage_metadata


def lora_config(cur: Curriculum, family: str):
    """PEFT ``LoraConfig`` restricted to the language model (the family's regex by default)."""
    from peft import LoraConfig

    lora = cur.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_regex or get_family(family).lora_target_regex,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def plan_checkpointing(setting: bool | str, device: str) -> bool:
    """Whether to checkpoint activations: ``train.gradient_checkpointing`` for ``device``.

    "auto" is on for CUDA (where activations, not weights, decide whether a page fits: 7,739
    image tokens took a 7B to 94.7 GB at batch 1) and off on CPU (tiny models, where it only
    costs time).
    """
    if setting == "auto":
        return device.startswith("cuda")
    return bool(setting)


#: Non-reentrant checkpointing: works with frozen inputs (LoRA's frozen embeddings), keyword
#: arguments and the RNG state of dropout, as PEFT recommends.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_checkpointing(model: Any) -> None:
    """Turn activation checkpointing on, the PEFT-compatible way (before LoRA is attached).

    Input embeddings are made to require grad too (``enable_input_require_grads``): a
    checkpointed block whose inputs need no grad would otherwise pass none back to the LoRA
    factors before it, should any module fall back to reentrant checkpointing.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    model.enable_input_require_grads()
    # a KV cache is of no use to a training forward (VLMs read it from the text config)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False


def build_stage_model(
    cur: Curriculum, base: str, family: str, finished: list[Path]
) -> tuple[Any, Any]:
    """The trainable PEFT model a stage starts from, given the finished adapters before it."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    t = cur.train
    device = t.device or _device()
    model, processor, _ = load_vlm(
        base,
        family,
        t.dtype,
        device,
        t.quantize_4bit,
        max_pixels=t.max_pixels,
        where=f"{cur.source}: key 'train.max_pixels'",
    )
    checkpointing = plan_checkpointing(t.gradient_checkpointing, device)
    if t.quantize_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS),
        )
    elif checkpointing:
        enable_checkpointing(model)
    if cur.lineage == "continued" and finished:
        return PeftModel.from_pretrained(model, str(finished[-1]), is_trainable=True), processor
    for folder in finished:  # stacked: fold each previous stage into the base, in order
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return get_peft_model(model, lora_config(cur, family)), processor


def _device() -> str:
    return machine_precision().device


def _optimizer_steps(plan: StagePlan, n_batches: int, grad_accum: int) -> int:
    if plan.stage.steps is not None:
        return plan.stage.steps
    return max(1, math.ceil(n_batches * plan.stage.epochs / grad_accum))


def train_stage(
    accelerator: Any,
    cur: Curriculum,
    plan: StagePlan,
    model: Any,
    processor: Any,
    family: str,
    progress: bool,
) -> tuple[Any, int, list[float]]:
    """Train ``model`` on one stage; return the unwrapped model, steps done and per-step losses."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    t = cur.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.stage.lr or t.lr, weight_decay=t.weight_decay)
    loader = DataLoader(
        plan.samples,
        batch_size=t.batch_size,
        shuffle=True,
        collate_fn=partial(encode_batch, processor, family),
        generator=torch.Generator().manual_seed(cur.seed + plan.index),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = _optimizer_steps(plan, len(loader), t.grad_accum)
    scheduler = get_scheduler(
        t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total),
        num_training_steps=total,
    )
    label = f"train {plan.stage.name} (stage {plan.index + 1}/{len(cur.stages)})"
    model.train()
    step, losses, micro = 0, [], []
    with phase(label, total, unit="steps", enabled=progress and accelerator.is_main_process) as bar:
        while step < total:
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                micro.append(loss.detach())
                if not accelerator.sync_gradients:
                    continue
                # Mean over the accumulated micro-batches, then over processes.
                value = accelerator.reduce(torch.stack(micro).mean(), reduction="mean").item()
                micro, step = [], step + 1
                losses.append(round(value, 6))
                bar.advance(1)
                bar.info(f"loss {value:.4f}")
                if step >= total:
                    break
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped, step, losses


def _write_stage(model: Any, plan: StagePlan, meta: Any) -> None:
    """Save adapter + lineage into a temporary folder, then rename it into place."""
    with atomic_folder(plan.out_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_stage_metadata(tmp, meta)


def check_stage_images(
    cur: Curriculum, plans: list[StagePlan], max_bad_share: float | None = None
) -> dict[int, int]:
    """Drop the samples with unreadable images from every stage before any training starts.

    Returns ``{stage index: skipped image files}`` (``dataset.skipped_images`` in each stage's
    ``emomerge.json``); a stage whose images are unreadable beyond ``max_bad_share`` (default:
    the curriculum's ``train.max_bad_image_share`` when it has one, else 5 %) stops the run with
    one line. The checked split is what the stage trains on (after ``max_samples``), so its
    ``dataset.sha256`` is recomputed when files were skipped: a resumed run that sees the same
    files skips the same ones and matches; one that sees another set (a file repaired or newly
    broken) is refused as other data by ``check_resumable``.
    """
    share = (
        max_bad_share
        if max_bad_share is not None
        else getattr(cur.train, "max_bad_image_share", MAX_BAD_IMAGE_SHARE)
    )
    skipped = {}
    for plan in plans:
        where = f"{cur.source}: stages.{plan.index} ({plan.stage.name})"
        plan.samples, skipped[plan.index] = check_images(
            plan.samples, max_bad_share=share, where=where
        )
        if skipped[plan.index]:
            plan.data_sha256 = samples_sha256(plan.samples)
    return skipped


def _source_dir(cur: Curriculum) -> Path | None:
    """The curriculum file's folder (relative paths in it resolve there), if it came from one."""
    return Path(cur.source).parent if cur.source and Path(cur.source).is_file() else None


def _as_curriculum(obj: Curriculum | dict | str | Path) -> Curriculum:
    if isinstance(obj, Curriculum):
        return obj
    if isinstance(obj, dict):
        return parse_curriculum(obj)
    return load_curriculum(obj)


def train_curriculum(
    curriculum_yaml_or_obj: Curriculum | dict | str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    max_stages: int | None = None,
    max_bad_image_share: float | None = None,
) -> list[Path]:
    """Train every stage of a curriculum into ``out_dir/adapters/<stage>/``; return those folders.

    Finished stages (complete folders from an earlier, interrupted run with the same curriculum)
    are skipped. ``max_stages`` stops after that many stages in total (a deliberate interruption).
    ``max_bad_image_share``: see :func:`check_stage_images`.
    Runs unchanged under ``accelerate launch`` (the main process writes, the others wait).

    Deterministic on CPU: the same curriculum and seed give byte-identical adapter files, in
    one run or across a kill and resume (stage k is seeded with ``seed + k`` before its model is
    built, and its data order comes from a generator seeded the same way).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cur = _as_curriculum(curriculum_yaml_or_obj)
    out = Path(out_dir)
    # A missing local base is one line now, not a hub lookup after the data is read.
    base = resolve_model(
        cur.resolved_base(), where=f"{cur.source}: key 'base_model'", relative_to=_source_dir(cur)
    )
    family = cur.family or detect_family(base)
    plan = machine_precision(cur.train.quantize_4bit, cur.train.dtype, cur.train.device)
    plans = plan_stages(cur, out)
    skipped = check_stage_images(cur, plans, max_bad_image_share)
    accelerator = Accelerator(
        gradient_accumulation_steps=cur.train.grad_accum, cpu=plan.device == "cpu"
    )
    if accelerator.is_main_process:
        # A killed run's temporaries, at start (each stage's atomic_folder sweeps its own again):
        # only those of dead processes of this host, boot and user — another run writing to the
        # same folder, here or on another host, keeps its own (DESIGN.md, Outputs).
        for stage_plan in plans:
            sweep_stale(stage_plan.out_dir)
    base_sha = recorded_base_hash(base)  # DESIGN.md, Layers
    # the processor alone: the resolved cap is compared with finished stages before training
    image = image_cap_record(
        base, family, cur.train.max_pixels, where=f"{cur.source}: key 'train.max_pixels'"
    )
    checkpointing = plan_checkpointing(cur.train.gradient_checkpointing, plan.device)
    done: list[Path] = []
    for i, stage_plan in enumerate(plans):
        if max_stages is not None and i >= max_stages:
            break
        if is_complete(stage_plan.out_dir):
            check_resumable(
                stage_plan,
                cur,
                base,
                family=family,
                base_sha=base_sha,
                parent=plans[i - 1] if i else None,
                image=image,
            )
            done.append(stage_plan.out_dir)
            continue
        if stage_plan.out_dir.exists():
            raise InputError(f"{stage_plan.out_dir}: exists but is not a finished stage adapter")
        # Seed before building: a fresh LoRA's A matrices are drawn at creation.
        set_seed(cur.seed + i)
        model, processor = build_stage_model(cur, base, family, done)
        model, steps, losses = train_stage(
            accelerator, cur, stage_plan, model, processor, family, progress
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            prev = plans[i - 1] if i else None
            meta = stage_metadata(
                stage_plan,
                cur,
                prev,
                base,
                family,
                base_sha,
                steps,
                losses,
                accelerator.num_processes,
                image=image,
                gradient_checkpointing=checkpointing,
            )
            meta.dataset["skipped_images"] = skipped[i]
            _write_stage(model, stage_plan, meta)
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        done.append(stage_plan.out_dir)
    return done
