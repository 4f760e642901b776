"""The one registry of merge methods: name → ``MergeMethod``.

Imports the method modules (``methods.py``: the mergekit family; ``svd_methods.py``: the
LoRA-native SVD methods), which import nothing of each other, and declares each method's entry:
its parameters (defaults, ranges, the help its command shows) and what the streamed path needs
(sparsifier, consensus, linear, streamable). The CLI (``emomerge/cli_merge.py``), the engine,
recipes and the streamed path read this table and nothing else about a method
(DESIGN.md, How to add a method).
"""

from __future__ import annotations

from dataclasses import replace

from . import svd_methods as svd
from .methods import (
    Consensus,
    MergeMethod,
    Param,
    Sparsifier,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    task_arithmetic,
    ties,
)
from .spaces import SPACES

# -- parameters ------------------------------------------------------------------------------
# ``help`` is what the method commands show for the option (one text per name).
_WEIGHT = Param("weight", float, 1.0, "One weight per adapter (default 1).", per_adapter=True)
_LAMBDA = Param("lambda", float, 1.0, "Scale of the merged update.")


def _density() -> Param:
    # mergekit's default (1.0: nothing dropped), so a recipe means the same in both tools.
    return Param(
        "density",
        float,
        1.0,
        "Fraction kept, in (0, 1]; one value or one per adapter.",
        per_adapter=True,
        low=0.0,
        high=1.0,
    )


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "Divide by the (agreeing) weight sum.")


def _rescale(default: bool, dare: bool = False) -> Param:
    """Rescale the survivors: true keeps each task vector's L1 norm (mergekit); DARE also takes
    'density' (×1/p, as in the DARE paper); false: none."""
    if dare:
        return Param(
            "rescale",
            bool,
            default,
            "true (keep each task vector's L1 norm) | false | density (×1/p, the DARE paper).",
            choices=(True, False, "density"),
        )
    return Param("rescale", bool, default, "true (keep each task vector's L1 norm) | false.")


# the fraction of largest-magnitude outliers dropped is at most 1 − density: as mergekit, the cut
# shrinks so density is kept; the manifest records gamma_effective (params.effective_gamma)
_GAMMA = Param(
    "gamma",
    float,
    0.01,
    "Breadcrumbs: top outlier fraction dropped.",
    per_adapter=True,
    low=0.0,
    high=1.0,
    low_inclusive=True,
)
# the keep probabilities spread over density ± epsilon (sparsify.della_magprune)
_EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "DELLA: spread of keep probabilities.",
    per_adapter=True,
    low=0.0,
    high=1.0,
)
_PAPER = Param("paper", bool, False, "TIES: Yadav et al.'s unweighted election and count mean.")
_SPACE = Param(
    "space",
    str,
    "dense",
    "Where the method runs: dense (default), core (LoRA core space) or knots (KnOTS joint-SVD "
    "space).",
    choices=("dense", *SPACES),
)
# 0 means 1/n, the paper's choice
_FRACTION = Param(
    "fraction",
    float,
    0.0,
    "TSV: fraction of each task's singular vectors kept (default 1/n).",
    low=0.0,
    high=1.0,
    low_inclusive=True,
)
_COMMON = Param(
    "common_space_fraction",
    float,
    0.8,
    "Iso-CTS: share of the rank given to the common subspace.",
    low=0.0,
    high=1.0,
    low_inclusive=True,
)

#: The order in which commands list the parameters' options; parameters of methods registered
#: later (not named here) follow in the order they are first declared.
PARAMETER_ORDER = (
    "weight",
    "density",
    "gamma",
    "epsilon",
    "lambda",
    "normalize",
    "rescale",
    "paper",
    "space",
    "fraction",
    "common_space_fraction",
)

# -- the registry ----------------------------------------------------------------------------
METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` (with the ``space`` parameter every method takes) and return the entry.

    The CLI command, ``emomerge methods``, recipes and — if it declares itself ``streamable`` —
    the streamed path pick it up from here."""
    if method.name in METHODS:
        raise ValueError(f"merge method '{method.name}' is already registered")
    if method.streamable:  # what the streamed pass reads, checked now rather than mid-merge
        needs = {"weight"} | method.sparsifier.reads
        missing = sorted(needs - {p.name for p in method.params})
        if missing:
            raise ValueError(
                f"merge method '{method.name}' is streamable with sparsifier "
                f"{method.sparsifier.value} but lacks the parameters {missing}"
            )
    if method.param("space") is None:
        method = replace(method, params=method.params + (_SPACE,))
    METHODS[method.name] = method
    return method


def get(name: str) -> MergeMethod | None:
    """The entry of ``name`` (``-`` read as ``_``), or None."""
    return METHODS.get(name.replace("-", "_"))


def parameters() -> dict[str, list[Param]]:
    """Every parameter name of the registered methods → its declarations (one per method that
    takes it), in ``PARAMETER_ORDER`` and then first-declared order."""
    found: dict[str, list[Param]] = {}
    for method in METHODS.values():
        for p in method.params:
            found.setdefault(p.name, []).append(p)
    rank = {name: i for i, name in enumerate(PARAMETER_ORDER)}
    order = sorted(found, key=lambda name: (rank.get(name, len(rank)), list(found).index(name)))
    return {name: found[name] for name in order}


for _m in (
    MergeMethod(
        "linear",
        linear,
        "https://arxiv.org/abs/2203.05482",
        "weighted average of task vectors",
        (_WEIGHT, _normalize(True)),
        linear=True,
        streamable=True,
        # mergekit's linear averages whole models and, given a base_model, counts the base as
        # one more input needing a weight; its task_arithmetic over the task vectors with the
        # same normalize (written explicitly on export) is exactly ours: base + Σ w τ / Σ w
        mergekit="task_arithmetic",
    ),
    MergeMethod(
        "task_arithmetic",
        task_arithmetic,
        "https://arxiv.org/abs/2212.04089",
        "λ · Σ w_i τ_i",
        (_WEIGHT, _LAMBDA, _normalize(False)),
        linear=True,
        streamable=True,
        mergekit="task_arithmetic",
    ),
    MergeMethod(
        "ties",
        ties,
        "https://arxiv.org/abs/2306.01708",
        "trim by magnitude, elect sign, disjoint mean",
        (_WEIGHT, _density(), _LAMBDA, _normalize(True), _rescale(False), _PAPER),
        sparsifier=Sparsifier.MAGNITUDE,
        consensus=Consensus.SIGN,
        streamable=True,
        unstreamed_when=("paper",),
        mergekit="ties",
    ),
    MergeMethod(
        "dare_linear",
        dare_linear,
        "https://arxiv.org/abs/2311.03099",
        "random drop (seeded), then task arithmetic",
        (_WEIGHT, _density(), _LAMBDA, _normalize(False), _rescale(True, dare=True)),
        random=True,
        sparsifier=Sparsifier.RANDOM_DROP,
        streamable=True,
        mergekit="dare_linear",
    ),
    MergeMethod(
        "dare_ties",
        dare_ties,
        "https://arxiv.org/abs/2311.03099",
        "random drop (seeded), then TIES sign consensus",
        (_WEIGHT, _density(), _LAMBDA, _normalize(False), _rescale(True, dare=True)),
        random=True,
        sparsifier=Sparsifier.RANDOM_DROP,
        consensus=Consensus.SIGN,
        streamable=True,
        mergekit="dare_ties",
    ),
    MergeMethod(
        "breadcrumbs",
        breadcrumbs,
        "https://arxiv.org/abs/2312.06795",
        "drop outliers and small entries, then task arithmetic",
        (_WEIGHT, _density(), _GAMMA, _LAMBDA, _normalize(False), _rescale(False)),
        sparsifier=Sparsifier.MAGNITUDE_OUTLIERS,
        streamable=True,
        mergekit="breadcrumbs",
    ),
    MergeMethod(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        "https://arxiv.org/abs/2312.06795",
        "breadcrumbs sparsification with TIES sign consensus",
        (_WEIGHT, _density(), _GAMMA, _LAMBDA, _normalize(False), _rescale(False)),
        sparsifier=Sparsifier.MAGNITUDE_OUTLIERS,
        consensus=Consensus.SIGN,
        streamable=True,
        mergekit="breadcrumbs_ties",
    ),
    MergeMethod(
        "della",
        della,
        "https://arxiv.org/abs/2406.11617",
        "magnitude-ranked random drop (MagPrune), then TIES sign consensus",
        (_WEIGHT, _density(), _EPSILON, _LAMBDA, _normalize(True), _rescale(True)),
        random=True,
        sparsifier=Sparsifier.MAGPRUNE,
        consensus=Consensus.SIGN,
        streamable=True,
        mergekit="della",
    ),
    MergeMethod(
        "della_linear",
        della_linear,
        "https://arxiv.org/abs/2406.11617",
        "magnitude-ranked random drop (MagPrune), then task arithmetic",
        (_WEIGHT, _density(), _EPSILON, _LAMBDA, _normalize(False), _rescale(True)),
        random=True,
        sparsifier=Sparsifier.MAGPRUNE,
        streamable=True,
        mergekit="della_linear",
    ),
    # SVD methods: not element-wise (no streamed path); they commute with the core space's
    # orthonormal bases, where the engine runs them for LoRA factors (``core_equivalent``)
    MergeMethod(
        "tsv",
        svd.tsv,
        "https://arxiv.org/abs/2412.00081",
        "TSV-Merge: keep each task's top singular vectors, decorrelate them (Procrustes)",
        (_WEIGHT, _FRACTION, _LAMBDA),
        extra={"core_equivalent": True},
    ),
    MergeMethod(
        "iso_c",
        svd.iso_c,
        "https://arxiv.org/abs/2502.04959",
        "Iso-C: task arithmetic with its singular values replaced by their mean",
        (_WEIGHT, _LAMBDA),
        extra={"core_equivalent": True},
    ),
    MergeMethod(
        "iso_cts",
        svd.iso_cts,
        "https://arxiv.org/abs/2502.04959",
        "Iso-CTS: Iso-C over the common subspace plus each task's own directions",
        (_WEIGHT, _COMMON, _LAMBDA),
        extra={"core_equivalent": True},
    ),
):
    register(_m)
del _m
