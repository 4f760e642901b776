"""The experiment YAML: architectures × one curriculum × merge recipes × evaluation sets × seeds.

    emomerge run experiments/qwen2_5_vl_7b.yaml --out runs/qwen2_5_vl_7b

Validated with pydantic at load (unknown keys are errors), so a typo fails before any model is
read; every error is one line naming the file and the key (DESIGN.md, Configuration). Relative
paths (models, data, curriculum files, recipes) resolve against the YAML's folder; a recipe not
found there is looked up in the repository's ``merge_configs/``.
"""

from __future__ import annotations

import atexit
import glob
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emomerge.merging.atomic import atomic_file, sweep_stale
from emomerge.merging.config import (
    ConfigError,
    SafeName,
    Strict,
    check_safe_name,
    dump_yaml,
    key_error,
    load_yaml,
    require_mapping,
    validate,
)
from emomerge.merging.errors import InputError
from emomerge.training.curriculum import DatasetName, LoraOverrides, Stage, TrainOverrides


def publish_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, and only if it differs: every process of a
    distributed run writes the same file while the others may be reading it (DESIGN.md,
    Outputs)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            sweep_stale(path)  # a killed writer's temporary of an unchanged file still goes
            return
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_file(path) as fh:
        fh.write(text)


#: The repository's merge recipes (present in a checkout / editable install).
MERGE_CONFIGS = Path(__file__).resolve().parents[1] / "merge_configs"
#: Variant names the runner gives itself; merges may not take them.
RESERVED = ("base", "single-stage")


class Architecture(Strict):
    """One base model: a hub id or a local folder, with optional LoRA / training overrides."""

    model: str
    name: SafeName | None = None  # the label in tables; default: the family
    family: str | None = None
    #: overrides of curriculum.lora / curriculum.train: typed, an unknown key fails at load
    lora: LoraOverrides = Field(default_factory=LoraOverrides)  # type: ignore[valid-type]
    train: TrainOverrides = Field(default_factory=TrainOverrides)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class CurriculumSpec(Strict):
    """The chain of stages: a curriculum YAML (``file``) or its parts inline.

    From a file, its ``base_model`` and ``seed`` are replaced by each architecture and seed.
    """

    file: str | None = None
    lineage: Literal["continued", "stacked"] | None = None
    lora: LoraOverrides | None = None  # type: ignore[valid-type]
    train: TrainOverrides | None = None  # type: ignore[valid-type]
    stages: list[Stage] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> CurriculumSpec:
        if (self.file is None) == (self.stages is None):
            raise ValueError("give either a curriculum file or inline 'stages', not both")
        return self


class MergeSpec(Strict):
    """One merge of the main chain's stage adapters: a recipe file or an inline recipe."""

    name: SafeName | None = None  # default: the recipe file's stem or the method
    recipe: str | None = None
    inline: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"recipe": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> MergeSpec:
        if (self.recipe is None) == (self.inline is None):
            raise ValueError("give exactly one of 'recipe' (a file) or 'inline' (a recipe)")
        return self


class EvalSet(Strict):
    """One test split every variant is scored on."""

    name: SafeName | None = None  # default: the dataset
    dataset: DatasetName
    path: str
    split: str = "test"
    task: str | None = None  # the reader's task (utterance, dominant_emotion, ...)
    options: dict[str, Any] = Field(default_factory=dict)  # reader options (image_root, ...)
    mode: Literal["auto", "likelihood", "generate"] = "auto"
    multilabel: Literal["threshold", "topk"] = "threshold"
    threshold: float | None = Field(None, ge=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    # multi-label likelihood: whole label sets (presence probabilities) or the first label only
    scoring: Literal["auto", "label_set", "first_label"] = "auto"
    max_labels: int = Field(3, ge=1)  # label_set: largest label set scored
    length_norm: bool = False  # mean log-prob per token instead of the sum
    # single-label likelihood: each label closed by the end-of-turn (needed when one label
    # starts another; evaluation/runner.py refuses such a set without it)
    append_eot: bool = False

    @property
    def label(self) -> str:
        return self.name or self.dataset


class Evaluation(Strict):
    sets: list[EvalSet] = Field(min_length=1)
    #: The paired test's reference: last_stage (the chain's end), single_stage, base, or a name.
    baseline: str = "last_stage"
    n_boot: int = Field(1000, ge=10)
    batch_size: int = Field(8, ge=1)
    paired_test: Literal["bootstrap", "mcnemar"] = "bootstrap"
    #: Re-factorised sparse merges scored exactly (recomputed from their inputs and written into
    #: the loaded base); false scores their rank-limited adapters (rows say lowrank).
    exact_merges: bool = True

    @model_validator(mode="after")
    def _unique_sets(self) -> Evaluation:
        labels = [s.label for s in self.sets]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(
                f"evaluation set names must be unique (repeated: {dup}); give each a 'name'"
            )
        return self


class Ablations(Strict):
    """The controlled comparisons built next to the chain and its merges."""

    single_stage: bool = True  # a LoRA trained on the target stage alone
    chain_without_stage: bool = True  # the chain retrained without each auxiliary stage
    #: merges rebuilt without each input stage: true (every merge), false, or merge names
    merge_without_stage: bool | list[str] = True
    #: the evaluation sets (by name) that score the ablation variants (chains and merges without
    #: a stage); null: every set. Sizing a study: e.g. [emocomics35], the target only.
    evaluation_sets: list[str] | None = None


class Experiment(Strict):
    name: SafeName
    architectures: list[Architecture] = Field(min_length=1)
    curriculum: CurriculumSpec
    merges: list[MergeSpec] = Field(default_factory=list)
    evaluation: Evaluation
    ablations: Ablations = Field(default_factory=Ablations)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    #: torch intra-op threads (null: torch's default). 1 is fastest for tiny models on 2 cores.
    threads: int | None = Field(None, ge=1)
    device: str | None = None  # training and evaluation device (default: cuda when available)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique (got {v})")
        return v

    @model_validator(mode="after")
    def _known_ablation_sets(self) -> Experiment:
        names = [s.label for s in self.evaluation.sets]
        unknown = [n for n in self.ablations.evaluation_sets or [] if n not in names]
        if unknown:
            raise ValueError(
                f"ablations.evaluation_sets: {unknown} are not evaluation sets (sets: {names})"
            )
        return self


# ---------------------------------------------------------------- resolved form


@dataclass
class ResolvedMerge:
    name: str
    path: Path  # the recipe file (inline recipes are written under the run folder first)
    raw: dict[str, Any]  # the recipe as parsed YAML (what its content hash covers)


@dataclass
class LoadedExperiment:
    """The validated experiment with every path resolved and the curriculum parts merged."""

    spec: Experiment
    source: Path
    lineage: str
    #: the curriculum's settings (a file's, complete, or an inline curriculum's, as given) with
    #: ``curriculum.lora`` / ``curriculum.train`` laid over them
    lora: dict[str, Any]
    train: dict[str, Any]
    stages: list[dict[str, Any]]  # curriculum stage mappings, data paths absolute
    merges: list[ResolvedMerge]

    @property
    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.stages]

    def lora_of(self, arch: Architecture) -> dict[str, Any]:
        """The LoRA settings an architecture's stages train with: its overrides over ours."""
        return {**self.lora, **arch.lora.set_values()}

    def train_of(self, arch: Architecture) -> dict[str, Any]:
        """The training settings of an architecture's stages: its overrides over ours."""
        return {**self.train, **arch.train.set_values()}

    def model_path(self, arch: Architecture) -> str:
        """A local folder (absolute) when it exists relative to the YAML, else the hub id."""
        local = _resolve(self.source, arch.model)
        return str(local) if local.exists() else arch.model


def _resolve(source: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (source.parent / p).resolve()


def _curriculum_parts(exp: Experiment, source: Path) -> tuple[str, dict, dict, list[dict]]:
    from emomerge.training.curriculum import load_curriculum

    spec = exp.curriculum
    lora_over = spec.lora.set_values() if spec.lora is not None else {}
    train_over = spec.train.set_values() if spec.train is not None else {}
    if spec.file is not None:
        path = _resolve(source, spec.file)
        if not path.is_file():
            raise key_error(source, "curriculum.file", f"{path} not found")
        cur = load_curriculum(path)
        stages = [s.model_dump() for s in cur.stages]
        for s in stages:
            s["path"] = str(cur.resolve(s["path"]).resolve())
            for k in ("image_root", "manga109_root"):
                if k in s["options"]:
                    s["options"][k] = str(cur.resolve(str(s["options"][k])).resolve())
        lineage = spec.lineage or cur.lineage
        lora = {**cur.lora.model_dump(), **lora_over}
        train = {**cur.train.model_dump(), **train_over}
    else:
        stages = []
        for stage in spec.stages or []:
            s = stage.model_dump()
            s["path"] = str(_resolve(source, s["path"]))
            for k in ("image_root", "manga109_root"):
                if k in s["options"]:
                    s["options"][k] = str(_resolve(source, str(s["options"][k])))
            stages.append(s)
        lineage, lora, train = spec.lineage or "continued", lora_over, train_over
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise key_error(source, "curriculum.stages", "stage names must be unique")
    if not stages:
        raise key_error(source, "curriculum.stages", "at least one stage is needed")
    return lineage, lora, train, stages


def _find_recipe(source: Path, value: str, where: str) -> list[Path]:
    cands = [_resolve(source, value)]
    if not Path(value).is_absolute():
        cands.append(
            MERGE_CONFIGS / Path(value).name
            if value.startswith("merge_configs/")
            else MERGE_CONFIGS / value
        )
    for cand in cands:
        if any(ch in str(cand) for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(cand)))
            if found:
                return found
        elif cand.is_file():
            return [cand]
    raise key_error(
        source,
        where,
        f"recipe {value} not found (relative to the experiment file, or in {MERGE_CONFIGS})",
    )


def _check_recipe(
    path: Path, stage_names: list[str], source: Path, where: str, shown: str, inline: bool = False
) -> dict[str, Any]:
    from emomerge.merging.recipe import load_recipe

    try:
        recipe = load_recipe(path)
    except ConfigError as exc:
        if inline and exc.key is not None:  # the key inside the experiment file
            raise key_error(source, f"{where}.{exc.key}", exc.detail) from exc
        raise key_error(source, where, f"({shown}) {exc.problem}") from exc
    except InputError as exc:
        msg = str(exc).splitlines()[0].replace(f"{path}: ", "")
        raise key_error(source, where, f"({shown}) {msg}") from exc
    for j, m in enumerate(recipe.models):
        model = m.model.split("+", 1)[-1].rstrip("/")
        parts = Path(model).parts
        if (
            Path(model).is_absolute()
            or len(parts) != 2
            or parts[0] != "adapters"
            or parts[1] not in stage_names
        ):
            raise key_error(
                source,
                f"{where}.models.{j}.model" if inline else where,
                ("" if inline else f"({shown}) ") + f"'{m.model}' is not a stage "
                f"adapter of the curriculum (expected adapters/<stage>, stages: "
                f"{stage_names})",
            )
    return load_yaml(path, what="recipe file")


def _inline_folder(inline_dir: str | Path | None) -> Callable[[], Path]:
    """Where inline recipes are written, made on first use: ``inline_dir``, or a temporary
    folder removed when the process exits (the recipes live as long as the loaded experiment
    can be used)."""
    made: list[Path] = []

    def folder() -> Path:
        if not made:
            if inline_dir:
                made.append(Path(inline_dir))
                made[0].mkdir(parents=True, exist_ok=True)
            else:
                made.append(Path(tempfile.mkdtemp(prefix="emomerge-recipes-")))
                atexit.register(shutil.rmtree, made[0], True)
        return made[0]

    return folder


def _merges(
    exp: Experiment, source: Path, stage_names: list[str], inline_dir: Callable[[], Path]
) -> list[ResolvedMerge]:
    out: list[ResolvedMerge] = []
    for i, spec in enumerate(exp.merges):
        where = f"merges.{i}"
        if spec.inline is not None:
            name = spec.name or str(spec.inline.get("merge_method", f"merge{i}"))
            try:  # the recipe is written to <name>.yaml: never outside the folder
                check_safe_name(name)
            except ValueError as exc:
                raise key_error(
                    source, f"{where}.inline.merge_method", f"{exc} (or give the merge a 'name')"
                ) from None
            path = inline_dir() / f"{name}.yaml"
            publish_text(path, dump_yaml(spec.inline))
            raw = _check_recipe(path, stage_names, source, f"{where}.inline", name, inline=True)
            out.append(ResolvedMerge(name, path, raw))
            continue
        found = _find_recipe(source, spec.recipe or "", f"{where}.recipe")
        if spec.name and len(found) > 1:
            raise key_error(source, f"{where}.name", f"a name for a glob of {len(found)} recipes")
        for path in found:
            raw = _check_recipe(path, stage_names, source, f"{where}.recipe", path.name)
            out.append(ResolvedMerge(spec.name or path.stem, path, raw))
    names = [m.name for m in out]
    clash = sorted(
        {n for n in names if names.count(n) > 1}
        | {n for n in names if n in stage_names or n in RESERVED}
    )
    if clash:
        raise key_error(
            source,
            "merges",
            f"merge names must be unique and differ from stage "
            f"names and {list(RESERVED)} (clash: {clash})",
        )
    return out


def parse_experiment(
    data: Any, source: str | Path = "<experiment>", inline_dir: str | Path | None = None
) -> LoadedExperiment:
    """Validate an experiment mapping; errors name ``source`` and the key (DESIGN.md,
    Configuration)."""
    source = Path(source)
    exp = validate(Experiment, require_mapping(data, source), source)
    lineage, lora, train, stages = _curriculum_parts(exp, source)
    names = [s["name"] for s in stages]
    labels = [a.name or a.model for a in exp.architectures]
    if len(set(labels)) != len(labels):
        raise key_error(source, "architectures", "give each architecture a distinct 'name'")
    abl = exp.ablations.merge_without_stage
    merges = _merges(exp, source, names, _inline_folder(inline_dir))
    if isinstance(abl, list):
        unknown = sorted(set(abl) - {m.name for m in merges})
        if unknown:
            raise key_error(
                source,
                "ablations.merge_without_stage",
                f"{unknown} are not merge names ({[m.name for m in merges]})",
            )
    base = exp.evaluation.baseline
    allowed = {"last_stage", "single_stage", "base", *names, *(m.name for m in merges)}
    if base not in allowed:
        raise key_error(
            source,
            "evaluation.baseline",
            f"'{base}' is neither last_stage, single_stage, base nor a stage or merge name",
        )
    if base == "single_stage" and not exp.ablations.single_stage:
        raise key_error(
            source, "evaluation.baseline", "single_stage needs ablations.single_stage: true"
        )
    for s in exp.evaluation.sets:
        s.path = str(_resolve(source, s.path))
        for k in ("image_root", "manga109_root"):
            if k in s.options:
                s.options[k] = str(_resolve(source, str(s.options[k])))
    return LoadedExperiment(exp, source, lineage, lora, train, stages, merges)


def load_experiment(path: str | Path, inline_dir: str | Path | None = None) -> LoadedExperiment:
    """Read and validate an experiment YAML file."""
    path = Path(path).resolve()
    return parse_experiment(load_yaml(path, what="experiment file"), path, inline_dir)
