"""The whole study in one call: train what is missing, merge, evaluate every variant, report.

    result = run_experiment("experiments/qwen2_5_vl_7b.yaml", "runs/qwen2_5_vl_7b")

For each architecture and seed the runner builds the variants the study compares:

- ``base`` (zero-shot) and ``single-stage`` (a LoRA trained on the target stage alone),
- every stage of the sequential chain (stage-wise evaluation),
- every merge recipe over the chain's stage adapters,
- ``chain-without-<stage>``: the chain retrained without each auxiliary stage,
- ``<merge>-without-<stage>``: each merge rebuilt without each input stage,

and scores them all on every evaluation set (bootstrap intervals, a paired test against the
baseline). Every artefact lives under a folder named by the hash of what produced it, so a re-run
reuses whatever is finished and an edit recomputes only what it changes:

- a stage: base identity, lineage, LoRA and training settings, seed, and every stage up to it
  (config + data sha256, position) — the chain's prefix, so chains sharing a prefix share stages;
- a merge: the recipe's content and the sha256 of its input adapters;
- predictions: the evaluation module's cache (variant files + inference settings, split hash).

Layout of the run folder::

    train/<arch>/seed<k>/<chain>-<hash>/adapters/<stage>/   (train_curriculum's own layout)
    merges/<arch>/seed<k>/<merge>-<hash>/                   (+ ablations/<merge>-<hash>/)
    eval/<arch>/seed<k>/<set>/{leaderboard.csv, predictions/, details/}
    leaderboard.csv  leaderboard.md  plot.png  experiment.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emomerge.evaluation.cache import stable_hash
from emomerge.evaluation.variants import Variant, variant_from_dir

from .config import Architecture, LoadedExperiment, load_experiment, publish_text

Echo = Callable[[str], None]
ADAPTER_FILE = "adapter_model.safetensors"
#: Variant kinds that ``ablations.evaluation_sets`` can keep off an evaluation set.
ABLATION_KINDS = ("chain-ablation", "merge-ablation")
CHAIN_FILE = "chain.json"


@dataclass
class Chain:
    """One curriculum trained for an architecture and seed (the main chain or an ablation)."""

    name: str  # "main", "single-stage", "without-<stage>"
    curriculum: dict[str, Any]
    keys: list[str]  # content hash of each stage (its prefix)
    folder: Path

    def adapter(self, stage: str) -> Path:
        return self.folder / "adapters" / stage


@dataclass
class ExperimentResult:
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    leaderboard: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None
    #: what this call built (not reused), for reports and tests: kind → names
    built: dict[str, list[str]] = field(
        default_factory=lambda: {"stages": [], "merges": [], "scored": []}
    )


def _short(h: str) -> str:
    return h[:12]


def arch_label(arch: Architecture, family: str) -> str:
    return arch.name or family


# ---------------------------------------------------------------- chains and stage hashes


def chain_specs(exp: LoadedExperiment) -> list[tuple[str, list[dict[str, Any]]]]:
    """(chain name, stages) for the main chain and the ablation chains the experiment asks."""
    stages = exp.stages
    chains = [("main", stages)]
    abl = exp.spec.ablations
    if abl.single_stage and len(stages) > 1:
        chains.append(("single-stage", stages[-1:]))
    if abl.chain_without_stage and len(stages) > 1:
        chains += [(f"without-{s['name']}", [t for t in stages if t is not s]) for s in stages[:-1]]
    return chains


def curriculum_of(
    exp: LoadedExperiment, arch: Architecture, base: str, seed: int, stages: list[dict[str, Any]]
) -> dict[str, Any]:
    """The curriculum mapping ``train_curriculum`` takes for one chain."""
    train = exp.train_of(arch)
    if exp.spec.device and not train.get("device"):
        train["device"] = exp.spec.device
    return {
        "name": f"{exp.spec.name}",
        "base_model": base,
        "family": arch.family,
        "lineage": exp.lineage,
        "seed": seed,
        "lora": exp.lora_of(arch),
        "train": train,
        "stages": stages,
    }


def stage_keys(cur: dict[str, Any], base_identity: str, scratch: Path) -> list[str]:
    """Content hash of each stage: everything that determines its weights, prefix included.

    Reads every stage's data (``plan_stages``: the same checks and subsampling training does) for
    the data sha256. The stage's *position* is part of it: training seeds stage k with seed + k.
    """
    from emomerge.training.curriculum import parse_curriculum
    from emomerge.training.models.families import detect_family
    from emomerge.training.stages import plan_stages, text_format

    parsed = parse_curriculum(cur, "<experiment curriculum>")
    plans = plan_stages(parsed, scratch)
    # the same identity whatever the device / thread count (they do not change the update)
    head = {
        "base": base_identity,
        "family": cur.get("family"),
        "lineage": cur["lineage"],
        "seed": cur["seed"],
        "lora": parsed.lora.model_dump(),
        "train": {
            k: v
            for k, v in parsed.train.model_dump().items()
            if k not in ("device", "max_bad_image_share", "gradient_checkpointing")
        },
    }
    # a family whose training text changed (BOS, answer tail) gets new keys, so a run trains it
    # anew instead of meeting stages trained on the old text; the others keep theirs
    fmt = text_format(cur.get("family") or detect_family(cur["base_model"]))
    if fmt:
        head["text"] = fmt
    keys, prev = [], stable_hash(head)
    for plan in plans:
        stage = plan.stage.model_dump()
        prev = stable_hash([prev, plan.index, stage, plan.data_sha256])
        keys.append(prev)
    return keys


def _finished_stages(train_root: Path) -> dict[str, Path]:
    """Stage key → finished adapter folder, over every chain trained so far in the run."""
    from emomerge.training.stages import is_complete

    found: dict[str, Path] = {}
    for info in train_root.glob(f"*/{CHAIN_FILE}"):
        try:
            raw = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key, stage in zip(raw.get("keys", []), raw.get("stages", [])):
            folder = info.parent / "adapters" / stage
            if key not in found and is_complete(folder) and not folder.is_symlink():
                found[key] = folder
    return found


def prepare_chain(name: str, cur: dict[str, Any], root: Path, base_identity: str) -> Chain:
    """The chain's folder (named by its last stage's hash), with finished stages linked in.

    A stage another chain already trained (same prefix hash) becomes a relative symlink, so
    ``train_curriculum`` skips it as finished and its files are never rewritten.
    """
    root.mkdir(parents=True, exist_ok=True)
    keys = stage_keys(cur, base_identity, root / ".scratch")
    folder = root / f"{name}-{_short(keys[-1])}"
    stages = [s["name"] for s in cur["stages"]]
    (folder / "adapters").mkdir(parents=True, exist_ok=True)
    publish_text(
        folder / CHAIN_FILE,
        json.dumps(
            {"chain": name, "keys": keys, "stages": stages, "curriculum": cur},
            indent=1,
            default=str,
        ),
    )
    finished = _finished_stages(root)
    for key, stage in zip(keys, stages):
        target = folder / "adapters" / stage
        src = finished.get(key)
        if src is None or target.exists() or target.is_symlink():
            continue
        if src.resolve() != target.resolve():
            try:
                os.symlink(os.path.relpath(src, target.parent), target)
            except FileExistsError:  # another process of an accelerate launch linked it
                pass
    return Chain(name, cur, keys, folder)


def train_chain(chain: Chain, progress: bool) -> list[str]:
    """Train the chain's missing stages; return the names of the stages trained now."""
    from emomerge.training.stages import is_complete
    from emomerge.training.trainer import train_curriculum

    todo = [
        s["name"] for s in chain.curriculum["stages"] if not is_complete(chain.adapter(s["name"]))
    ]
    if todo:
        train_curriculum(chain.curriculum, chain.folder, progress=progress)
    return todo


# ---------------------------------------------------------------- merges


def merge_key(raw_recipe: dict[str, Any], inputs: list[Path]) -> str:
    """Recipe content + the sha256 of each input adapter's weights."""
    from emomerge.merging.adapters import sha256_file

    return stable_hash([raw_recipe, [sha256_file(p / ADAPTER_FILE) for p in inputs]])


def build_merges(
    exp: LoadedExperiment, main: Chain, root: Path, echo: Echo, progress: bool = False
) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """Run every recipe over the main chain's adapters (reused when its hash is on disk).

    Returns ([(merge name, folder, key)], names built now).
    """
    from emomerge.merging.recipe import adapter_path, load_recipe, run_recipe

    done, built = [], []
    for m in exp.merges:
        recipe = load_recipe(m.path)
        inputs = [adapter_path(e.model, recipe.base_model, main.folder) for e in recipe.models]
        key = merge_key(m.raw, inputs)
        out = root / f"{m.name}-{_short(key)}"
        if not (out / "emomerge.json").is_file():
            echo(
                f"  merge {m.name}"
                + (f" ({recipe.merge_method})" if recipe.merge_method != m.name else "")
            )
            run_recipe(m.path, out, root=main.folder, force=True, progress=progress)
            built.append(m.name)
        done.append((m.name, out, key))
    return done, built


def merge_ablations(
    merges: list[tuple[str, Path, str]],
    wanted: bool | list[str],
    root: Path,
    stage_names: list[str],
    exact: bool = True,
) -> list[Variant]:
    """Each selected merge without each of its input stages (evaluation's leave-one-stage-out).

    Keyed by the full merge's hash, so an edited recipe never reuses a stale ablation.
    """
    from emomerge.evaluation.ablation import leave_one_stage_out

    variants = []
    for name, folder, key in merges:
        if wanted is False or (isinstance(wanted, list) and name not in wanted):
            continue
        merged = variant_from_dir(folder, name=name, exact=exact)
        for v in leave_one_stage_out(merged, root / f"{name}-{_short(key)}", exact=exact):
            v.kind = "merge-ablation"
            variants.append(v)
    return variants


# ---------------------------------------------------------------- evaluation


def resolve_baseline(exp: LoadedExperiment) -> str:
    base = exp.spec.evaluation.baseline
    return {"last_stage": exp.stage_names[-1], "single_stage": "single-stage"}.get(base, base)


def _eval_config(exp: LoadedExperiment, s: Any, seed: int, baseline: str) -> Any:
    from emomerge.evaluation.runner import EvalConfig

    ev = exp.spec.evaluation
    return EvalConfig(
        dataset=s.dataset,
        split=s.split,
        mode=s.mode,
        multilabel=s.multilabel,
        threshold=s.threshold,
        max_new_tokens=s.max_new_tokens,
        scoring=s.scoring,
        max_labels=s.max_labels,
        length_norm=s.length_norm,
        append_eot=s.append_eot,
        batch_size=ev.batch_size,
        n_boot=ev.n_boot,
        seed=seed,
        baseline=baseline,
        paired_test=ev.paired_test,
    )


def evaluate_variants(
    exp: LoadedExperiment,
    host: Any,
    base: str,
    variants: list[Variant],
    root: Path,
    seed: int,
    progress: bool,
) -> tuple[list[dict], list[str]]:
    """Score ``variants`` (plus the base) on every evaluation set; rows and names scored now."""
    from emomerge.evaluation.pipeline import (
        load_checked,
        needs_validation,
        train_labels,
        validation_data,
    )
    from emomerge.evaluation.runner import evaluate

    rows, scored = [], []
    baseline = resolve_baseline(exp)
    on = exp.spec.ablations.evaluation_sets
    for s in exp.spec.evaluation.sets:
        scored_here = (
            variants
            if on is None or s.label in on
            else [v for v in variants if v.kind not in ABLATION_KINDS]
        )
        cfg = _eval_config(exp, s, seed, baseline)
        samples, skipped = load_checked(s.dataset, s.path, s.split, s.task, **s.options)
        val = pool = None
        if needs_validation(cfg):
            val, pool = validation_data(s.dataset, s.path, s.task, **s.options)
        labels = (
            train_labels(s.dataset, s.path, s.task, pool, **s.options)
            if cfg.resolved_task() != "vqa"
            else None
        )
        res = evaluate(
            host,
            base,
            scored_here,
            samples,
            root / s.label,
            cfg,
            val_samples=val,
            val_pool=pool,
            train_labels=labels,
            include_base=True,
            progress=progress,
            skipped_images=skipped,
        )
        for row in res.rows:
            row["dataset"] = s.dataset
        rows += res.rows
        scored += [f"{s.label}:{r.variant.name}" for r in res.results if r.scored]
    return rows, scored


# ---------------------------------------------------------------- the experiment


def _variants(
    exp: LoadedExperiment,
    chains: dict[str, Chain],
    merges: list[tuple[str, Path, str]],
    merge_abl: list[Variant],
) -> list[Variant]:
    main, last = chains["main"], exp.stage_names[-1]
    out = [variant_from_dir(main.adapter(s), name=s) for s in exp.stage_names]
    if "single-stage" in chains:
        v = variant_from_dir(chains["single-stage"].adapter(last), name="single-stage")
        v.kind = "single-stage"
        out.insert(0, v)
    exact = exp.spec.evaluation.exact_merges
    out += [variant_from_dir(folder, name=name, exact=exact) for name, folder, _ in merges]
    for name, chain in chains.items():
        if name.startswith("without-"):
            v = variant_from_dir(chain.adapter(last), name=f"chain-{name}")
            v.kind = "chain-ablation"
            out.append(v)
    return out + merge_abl


def _host_loading(exp: LoadedExperiment, arch: Architecture) -> dict[str, Any]:
    """How evaluation loads an architecture's base: at the image cap its stages trained with;
    exact merges need unquantized weights (spread over GPUs when there are several), else the
    training's 4-bit quantisation is reused."""
    import torch

    train = exp.train_of(arch)
    if exp.spec.evaluation.exact_merges:
        spread = torch.cuda.is_available() and torch.cuda.device_count() > 1
        return {
            "max_pixels": train.get("max_pixels"),
            "quantize_4bit": False,
            "device_map": "auto" if spread else None,
        }
    return {
        "max_pixels": train.get("max_pixels"),
        "quantize_4bit": True if train.get("quantize_4bit") else False,
    }


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def run_experiment(
    experiment: str | Path | LoadedExperiment,
    out: str | Path,
    *,
    progress: bool = True,
    echo: Echo = print,
) -> ExperimentResult:
    """Run (or resume) an experiment into ``out``; return the rows, table and file paths."""
    from emomerge.evaluation.distributed import current_shard
    from emomerge.evaluation.predict import ModelHost
    from emomerge.training.models.families import detect_family
    from emomerge.training.models.fingerprint import recorded_base_hash
    from emomerge.training.models.loading import resolve_model

    from .report import write_reports

    out = Path(out).resolve()
    shard = current_shard()
    exp = (
        experiment
        if isinstance(experiment, LoadedExperiment)
        else load_experiment(experiment, inline_dir=out / "recipes")
    )
    out.mkdir(parents=True, exist_ok=True)
    _set_threads(exp.spec.threads)
    result = ExperimentResult(out)
    labels = []
    for arch in exp.spec.architectures:
        base = exp.model_path(arch)
        i = exp.spec.architectures.index(arch)
        base = resolve_model(
            base,
            where=f"{exp.source}: key 'architectures.{i}.model'",
            relative_to=exp.source.parent,
        )
        family = arch.family or detect_family(base)
        label = arch_label(arch, family)
        labels.append(label)
        identity = stable_hash([base, recorded_base_hash(base)])
        host = None
        for seed in exp.spec.seeds:
            tag = f"{label} seed {seed}"
            chains: dict[str, Chain] = {}
            for name, stages in chain_specs(exp):
                cur = curriculum_of(exp, arch, base, seed, stages)
                chain = prepare_chain(name, cur, out / "train" / label / f"seed{seed}", identity)
                trained = train_chain(chain, progress)
                echo(
                    f"[train] {tag} {name}: "
                    + (f"trained {', '.join(trained)}" if trained else "all stages reused")
                )
                result.built["stages"] += [f"{label}/seed{seed}/{name}/{s}" for s in trained]
                chains[name] = chain
            mroot = out / "merges" / label / f"seed{seed}"
            # under accelerate launch the main process merges; the others then reuse its outputs
            if not shard.is_main:
                shard.barrier()
            merges, built = build_merges(exp, chains["main"], mroot, echo, progress)
            result.built["merges"] += [f"{label}/seed{seed}/{m}" for m in built]
            abl = merge_ablations(
                merges,
                exp.spec.ablations.merge_without_stage,
                mroot / "ablations",
                exp.stage_names,
                exact=exp.spec.evaluation.exact_merges,
            )
            if shard.is_main:
                shard.barrier()
            echo(
                f"[merge] {tag}: {len(merges)} merges ({len(built)} built), "
                f"{len(abl)} leave-one-stage-out merges"
            )
            variants = _variants(exp, chains, merges, abl)
            if host is None:
                host = ModelHost.load(
                    base, family=family, device=exp.spec.device or "cpu", **_host_loading(exp, arch)
                )
            rows, scored = evaluate_variants(
                exp, host, base, variants, out / "eval" / label / f"seed{seed}", seed, progress
            )
            for row in rows:
                row["architecture"] = label
                row["seed"] = seed
            echo(
                f"[eval] {tag}: {len(rows)} rows, {len(scored)} variant×set scored now "
                f"(the rest from the prediction cache)"
            )
            result.built["scored"] += [f"{label}/seed{seed}/{s}" for s in scored]
            result.rows += rows
        del host
    if not shard.is_main:  # every process computed the rows; the main one writes the reports
        return result
    publish_text(
        out / "experiment.json",
        json.dumps(
            {
                "experiment": str(exp.source),
                "name": exp.spec.name,
                "architectures": labels,
                "seeds": exp.spec.seeds,
                "stages": exp.stage_names,
                "merges": [m.name for m in exp.merges],
                "baseline": resolve_baseline(exp),
                "built": result.built,
            },
            indent=1,
        ),
    )
    write_reports(result, exp, resolve_baseline(exp))
    return result
