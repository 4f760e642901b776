"""``emomerge run --plan``: what an experiment will train, merge and score, and what scoring costs.

    emomerge run experiments/qwen2_5_vl.yaml --plan [--seconds-per-example 1.18]

Nothing runs: the plan counts, per architecture and seed, the chains and stages to train, the
merges and leave-one-stage-out merges to build, and per evaluation set the variants scored and
the examples each one costs (the test split, plus the held-out books a multi-label threshold is
chosen on). The projected scoring time is examples × seconds per example, a figure the user
gives (default 1.18 s: one forward pass of a Qwen2.5-VL-7B over one comic page prompt on an
H200, bf16, SDPA — measured, see the README's scale section); finished work is not subtracted.
Sizing a study: restrict which sets score the ablations with ``ablations.evaluation_sets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emomerge.merging.errors import InputError

from .config import LoadedExperiment

#: One forward pass over a comic page prompt, Qwen2.5-VL-7B, H200, bf16 (issue 13's measurement).
SECONDS_PER_EXAMPLE = 1.18


@dataclass
class SetPlan:
    """One evaluation set: how many variants score it, on how many examples."""

    name: str
    variants: int
    examples: int | None  # None: the split could not be read here
    validation: int | None  # examples a threshold is chosen on, per variant (multi-label)
    note: str = ""

    def per_variant(self) -> int | None:
        if self.examples is None:
            return None
        return self.examples + (self.validation or 0)

    def total(self) -> int | None:
        per = self.per_variant()
        return None if per is None else per * self.variants


@dataclass
class Plan:
    architectures: int
    seeds: int
    chains: list[str]
    stages: int  # stages trained per architecture and seed (shared prefixes trained once)
    merges: int
    merge_ablations: int
    sets: list[SetPlan] = field(default_factory=list)
    seconds_per_example: float = SECONDS_PER_EXAMPLE

    @property
    def runs(self) -> int:
        return self.architectures * self.seeds

    def examples(self) -> int | None:
        totals = [s.total() for s in self.sets]
        return None if any(t is None for t in totals) else sum(totals) * self.runs

    def table(self) -> str:
        lines = [
            f"{self.architectures} architecture(s) × {self.seeds} seed(s) = {self.runs} "
            "run(s); per run:",
            f"  train: {len(self.chains)} chains ({', '.join(self.chains)}), {self.stages} stages",
            f"  merge: {self.merges} merges, {self.merge_ablations} leave-one-stage-out merges",
            "",
            "| evaluation set | variants | examples | + validation | variant × examples |",
            "|---|---|---|---|---|",
        ]
        for s in self.sets:
            lines.append(
                f"| {s.name} | {s.variants} | {_n(s.examples)} | {_n(s.validation)} | "
                f"{_n(s.total())} |"
            )
        total = self.examples()
        lines.append("")
        if total is None:
            lines.append("scoring: some splits could not be read here (see notes); no total")
        else:
            hours = total * self.seconds_per_example / 3600
            lines.append(
                f"scoring: {total:,} example forwards over all runs × "
                f"{self.seconds_per_example:g} s = {hours:,.1f} GPU-hours "
                "(one process; divide by the processes of a data-parallel run)"
            )
        lines += [f"note: {s.name}: {s.note}" for s in self.sets if s.note]
        return "\n".join(lines) + "\n"


def _n(v: int | None) -> str:
    return "?" if v is None else f"{v:,}"


def _count(exp: LoadedExperiment, s: Any) -> tuple[int | None, int | None, str]:
    """Examples of the set's split and of its threshold validation part (or why unknown)."""
    from emomerge.evaluation.pipeline import load_split, needs_validation, validation_data
    from emomerge.evaluation.runner import EvalConfig

    try:
        test = load_split(s.dataset, s.path, s.split, s.task, **s.options)
    except InputError as exc:
        return None, None, str(exc).splitlines()[0]
    cfg = EvalConfig(
        dataset=s.dataset,
        split=s.split,
        mode=s.mode,
        multilabel=s.multilabel,
        threshold=s.threshold,
    )
    if not needs_validation(cfg):
        return len(test), 0, ""
    try:
        val, pool = validation_data(s.dataset, s.path, s.task, **s.options)
    except InputError as exc:
        return len(test), None, str(exc).splitlines()[0]
    if val is not None:
        return len(test), len(val), ""
    # the held-out books the stages record: about the curriculum's holdout fraction of train
    fraction = next(
        (
            st.get("holdout", {}).get("fraction", 0.1)
            for st in exp.stages
            if st.get("dataset") == s.dataset and st.get("holdout")
        ),
        0.1,
    )
    return len(test), round(len(pool or []) * fraction), "validation ≈ holdout fraction × train"


def plan_experiment(
    exp: LoadedExperiment, seconds_per_example: float = SECONDS_PER_EXAMPLE
) -> Plan:
    """Count what :func:`.run.run_experiment` would do (nothing is read but the splits)."""
    from emomerge.merging.recipe import load_recipe

    from .run import chain_specs

    if not seconds_per_example > 0 or seconds_per_example == float("inf"):
        raise InputError(
            f"--seconds-per-example: must be a positive number, got {seconds_per_example}"
        )
    chains = chain_specs(exp)
    # a chain's stages that another chain already trained (same prefix) are trained once
    prefixes = {
        tuple(s["name"] for s in stages[: i + 1])
        for _, stages in chains
        for i in range(len(stages))
    }
    wanted = exp.spec.ablations.merge_without_stage
    n_inputs = {m.name: len(load_recipe(m.path).models) for m in exp.merges}
    abl = sum(
        n
        for name, n in n_inputs.items()
        if n >= 2 and (wanted is True or (isinstance(wanted, list) and name in wanted))
    )
    ablation_chains = sum(1 for name, _ in chains if name.startswith("without-"))
    main = 1 + len(exp.stages) + len(exp.merges) + int(any(n == "single-stage" for n, _ in chains))
    on = exp.spec.ablations.evaluation_sets
    sets = []
    for s in exp.spec.evaluation.sets:
        scored_ablations = on is None or s.label in on
        variants = main + (ablation_chains + abl if scored_ablations else 0)
        examples, validation, note = _count(exp, s)
        sets.append(SetPlan(s.label, variants, examples, validation, note))
    return Plan(
        len(exp.spec.architectures),
        len(exp.spec.seeds),
        [n for n, _ in chains],
        len(prefixes),
        len(exp.merges),
        abl,
        sets,
        seconds_per_example,
    )
