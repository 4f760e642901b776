"""The curriculum YAML: a base model, LoRA settings and an ordered list of training stages.

Validated with pydantic (unknown keys are errors) when loaded, so a typo fails before any model
is read; errors name the file and the key, in the shared format (DESIGN.md, Configuration).
Relative paths resolve against the YAML's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_serializer, model_validator

from emomerge.merging.config import (
    SafeName,
    Strict,
    known_name,
    load_yaml,
    overrides,
    require_mapping,
    validate,
)

from .data import DATASETS

#: A dataset the readers know (training/data), refused with the known names otherwise.
DatasetName = Annotated[str, AfterValidator(known_name("dataset", DATASETS))]


def _compiles(v: str) -> str:
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"not a valid regex ({exc})") from exc
    return v


#: A Python regular expression, checked to compile.
Regex = Annotated[str, AfterValidator(_compiles)]


class LoraSettings(Strict):
    """LoRA hyper-parameters (PEFT ``LoraConfig``); targets default to the family's LM regex."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_regex: Regex | None = None
    use_rslora: bool = False


class TrainSettings(Strict):
    """Optimisation settings shared by all stages (a stage may override ``lr``)."""

    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    quantize_4bit: bool = False
    device: str | None = None
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    #: Share of a split's image files that may be unreadable (skipped with a counted warning,
    #: ``dataset.skipped_images``); more stops the run with one line.
    max_bad_image_share: float = Field(0.05, ge=0, le=1)
    #: Recompute each decoder layer's activations in the backward pass instead of keeping them
    #: (non-reentrant, PEFT-compatible): a 7B at a 1,000-token page keeps ~1/30 of the
    #: activations for ~30 % more compute. "auto" = on for CUDA, off on CPU (tiny models there
    #: gain nothing). It does not change the update, so it is no part of a stage's fingerprint.
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    #: Upper bound on the pixels the vision encoder sees per image, turned into each family's
    #: processor setting when the model is loaded (Qwen: ``max_pixels``; Pixtral:
    #: ``longest_edge``; LLaVA-NeXT: the any-res grids kept). null = the family default, ≈ 1 MP
    #: (``emomerge.training.models.families.IMAGE_CAPS``). Set explicitly, it is part of the stage's
    #: fingerprint; the resolved cap is in every stage's ``emomerge.json`` (``image``).
    max_pixels: int | None = Field(None, ge=1)

    @model_serializer(mode="wrap")
    def _omit_defaults_added_later(self, handler: Any) -> dict[str, Any]:
        # Left at their defaults, keys added after runs were made dump as before they existed:
        # content hashes of stages (resume fingerprints, the experiment runner's reuse keys)
        # stay those of the finished stages.
        data = handler(self)
        if data.get("gradient_checkpointing") == "auto":
            data.pop("gradient_checkpointing")
        if "max_pixels" in data and data["max_pixels"] is None:
            data.pop("max_pixels")
        return data


class HoldoutSettings(Strict):
    """Books held out of a stage's training split, for evaluation's validation part.

    ``ceil(fraction × #books)`` books (at least one, never all) drawn with ``seed``; the stage
    trains without them and records them in its ``emomerge.json`` (``dataset.holdout.books``).
    Only for datasets whose samples name their book (EmoComics35, MangaVQA).
    """

    fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class Stage(Strict):
    """One stage: a dataset split and how long to train on it."""

    name: SafeName
    dataset: DatasetName
    path: str
    split: str = "train"
    #: The split the stage is evaluated on; "auto" = "test" when the dataset has one (with
    #: ``eval_path``: "test", or the file's only split). Training is refused when it overlaps the
    #: training split (never train on the evaluation split); MangaVQA is compared by manga page
    #: (title + page number), as a page seen in training leaks its test answers. ``null``: the
    #: stage has no evaluation split, nothing is compared (recorded in ``emomerge.json``).
    eval_split: str | None = "auto"
    #: Where the evaluation split lives, when it is not beside the training data (relative to
    #: the curriculum file, like ``path``): e.g. MangaVQA's test parquet (hal-utokyo/MangaVQA)
    #: for a ``path`` holding only the training set (hal-utokyo/MangaVQA-train). A MangaVQA
    #: stage with neither this nor a test split beside ``path`` trains with a warning, and
    #: ``dataset.overlap_check`` in its ``emomerge.json`` says its pages were never checked.
    eval_path: str | None = None
    task: str | None = None
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    max_samples: int | None = Field(None, ge=1)
    #: Books left out of training (evaluation picks its multi-label threshold on them).
    holdout: HoldoutSettings | None = None
    #: Reader options: image_root, manga109_root, allow_missing_images.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = set(v) - {"image_root", "manga109_root", "allow_missing_images"}
        if bad:
            raise ValueError(f"unknown reader options {sorted(bad)}")
        return v

    @model_validator(mode="after")
    def _one_length(self) -> Stage:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of 'epochs' or 'steps'")
        return self

    @model_validator(mode="after")
    def _eval_path_needs_a_split(self) -> Stage:
        if self.eval_path is not None and self.eval_split is None:
            raise ValueError(
                "'eval_path' names an evaluation file but 'eval_split' is null; drop one of them"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_options(self, handler: Any) -> dict[str, Any]:
        # A stage without a holdout / eval_path dumps as it did before those options existed,
        # so content hashes of stages (the experiment runner's reuse keys) stay valid for
        # existing runs.
        data = handler(self)
        for key in ("holdout", "eval_path"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Curriculum(Strict):
    """A sequence of stages trained one after the other on one base model."""

    name: str | None = None
    base_model: str
    family: str | None = None
    lineage: Literal["continued", "stacked"] = "continued"
    seed: int = 0
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    stages: list[Stage] = Field(min_length=1)
    #: Folder the relative paths resolve against (set by the loader, not by the YAML).
    source: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Curriculum:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique (repeated: {dup})")
        return self

    def resolve(self, value: str) -> Path:
        """A data path: relative paths are relative to the curriculum file's folder."""
        if self.source is None or Path(value).is_absolute() or not Path(self.source).is_file():
            return Path(value)
        return Path(self.source).parent / value

    def resolved_base(self) -> str:
        """The base model: a folder (relative to the curriculum file) if it exists, else a hub id."""
        local = self.resolve(self.base_model)
        # Absolute, so a resumed run started from another working directory still matches.
        return str(local.resolve()) if local.exists() else self.base_model


#: An experiment's overrides of a curriculum's settings: any field of LoraSettings /
#: TrainSettings, each optional, typed and constrained as there (DESIGN.md, Configuration).
LoraOverrides = overrides(LoraSettings, "LoraOverrides")
TrainOverrides = overrides(TrainSettings, "TrainOverrides")


def parse_curriculum(data: Any, source: str = "<curriculum>") -> Curriculum:
    """Validate a curriculum mapping; errors name ``source`` and the key (DESIGN.md,
    Configuration)."""
    cur = validate(Curriculum, require_mapping(data, source), source)
    cur.source = source
    return cur


def load_curriculum(path: str | Path) -> Curriculum:
    """Read and validate a curriculum YAML file."""
    path = Path(path)
    return parse_curriculum(load_yaml(path, what="curriculum file"), str(path))
