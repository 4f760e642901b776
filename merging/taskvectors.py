"""Task vectors of stage adapters relative to a reference, as low-rank terms, module by module.

Each stage model is ``base + U_i`` where the cumulative update U_i is a signed sum of the
adapters' own updates ΔW_j = s_j B_j A_j, read off the lineage (docs/DESIGN.md, Words:
"Lineage"):

- no parent: U_i = ΔW_i
- stacked (parent folded into the base, fresh LoRA on top): U_i = U_parent + ΔW_i
- continued (the parent's LoRA kept training): U_i = U_parent − ΔW_parent + ΔW_i

Reference ``base``: τ_i = U_i. Reference ``previous``: τ_i = U_i − U_parent. Because every τ_i is
a combination of LoRA products, it stays low rank: ``[c_j L_j …] @ [R_j; …]``. Nothing dense is
built until a method needs it, and then one module at a time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import LoraAdapter, base_identity, check_finite, load_adapter
from .errors import MergeInputError
from .lineage import resolve_parent
from .lowrank import concat
from .names import name_suggests_vlm, resolve_plain

Combo = dict[int, float]  # pool index -> coefficient


@dataclass
class TaskVectors:
    """The task vectors of the merge inputs, with every adapter they are built from."""

    inputs: list[LoraAdapter]
    pool: list[LoraAdapter]  # inputs first, then ancestors read from lineage
    combos: list[Combo]  # per input
    reference: str
    modules: list[str]  # canonical module paths touched by any task vector
    shapes: dict[str, tuple[int, int]]
    #: lineage links whose parent's sha256 differs from the recorded one (when allowed)
    lineage_mismatches: list[dict] = field(default_factory=list)
    #: assumptions made about ancestors not on disk (continued chains, reference base)
    lineage_assumed: list[str] = field(default_factory=list)
    #: adapters read without a lineage emomerge.json: taken as independent updates of the base
    #: (``emomerge lineage set`` records a parent for one trained elsewhere on top of another)
    lineage_missing: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.inputs)

    def module_spec(self, path: str):
        """The LoraModule of ``path`` in the first adapter that has it (kind, transposition)."""
        return next(a.modules[path] for a in self.pool if path in a.modules)

    def lowrank(self, i: int, path: str, dtype: torch.dtype = torch.float32):
        """``(L, R)`` with L @ R = τ_i of module ``path``, or None when τ_i does not touch it."""
        terms = []
        for j, coeff in self.combos[i].items():
            adapter = self.pool[j]
            if path in adapter.modules:
                left, right = adapter.factors(path, dtype)
                terms.append((left, right, coeff))
        return concat(terms) if terms else None

    def dense(self, i: int, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        factors = self.lowrank(i, path, dtype)
        if factors is None:
            return torch.zeros(self.shapes[path], dtype=dtype)
        return factors[0] @ factors[1]

    def stacked(self, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All task vectors of one module: ``[n_adapters, out, in]``."""
        out = torch.empty((self.n, *self.shapes[path]), dtype=dtype)
        for i in range(self.n):
            factors = self.lowrank(i, path, dtype)
            if factors is None:
                out[i].zero_()
            else:
                torch.matmul(factors[0], factors[1], out=out[i])
        return out


@dataclass
class _Chain:
    """What following the lineage of one merge's inputs collects (ancestors, notes)."""

    pool: list[LoraAdapter]
    index_of: dict[Path, int]
    allow_pickle: bool
    #: continued stages whose parent is not on disk are taken as cumulative from the base
    #: (reference base only: U_i = U_parent − ΔW_parent + ΔW_i = ΔW_i along a continued chain)
    allow_missing_continued: bool
    allow_lineage_mismatch: bool
    memo: dict[int, Combo] = field(default_factory=dict)
    mismatches: list[dict] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)


def _cumulative(idx: int, chain: _Chain, stack: tuple[int, ...] = ()) -> Combo:
    """U_idx as a combination of the adapters' own updates (loads ancestors into the pool)."""
    if idx in chain.memo:
        return chain.memo[idx]
    if idx in stack:
        raise MergeInputError(f"{chain.pool[idx].path}: lineage has a cycle")
    adapter = chain.pool[idx]
    meta = adapter.metadata
    parent_dir = resolve_parent(adapter.path, meta)
    combo: Combo = defaultdict(float)
    if parent_dir is None or meta is None or meta.lineage.mode is None:
        combo[idx] += 1.0
    elif (
        meta.lineage.mode == "continued"
        and chain.allow_missing_continued
        and parent_dir not in chain.index_of
        and not parent_dir.exists()
    ):
        # The parent's update cancels (U_parent − ΔW_parent) when the chain above it is
        # continued too, which is what training writes; recorded, since it is not checked.
        chain.assumed.append(
            f"{adapter.path}: continued parent {meta.lineage.parent} not on disk; its chain taken "
            "as continued from the base (task vector = this adapter's update)"
        )
        combo[idx] += 1.0
    else:
        p = _pool_index(parent_dir, adapter, chain)
        _check_parent(adapter, chain.pool[p], chain)
        parent_u = _cumulative(p, chain, stack + (idx,))
        for j, c in parent_u.items():
            combo[j] += c
        if meta.lineage.mode == "continued":
            combo[p] -= 1.0
        combo[idx] += 1.0
    chain.memo[idx] = {j: c for j, c in combo.items() if c != 0.0}
    return chain.memo[idx]


def _check_parent(child: LoraAdapter, parent: LoraAdapter, chain: _Chain) -> None:
    """The parent's weights are the ones the child was trained on (``lineage.parent_sha256``).

    A parent retrained or overwritten after its child was trained makes every chained task
    vector silently wrong, so a mismatch is refused unless allowed (then it is recorded).
    """
    recorded = child.metadata.lineage.parent_sha256 if child.metadata else None
    if not recorded or any(m["child"] == str(child.path) for m in chain.mismatches):
        return
    found = parent.sha256
    if found == recorded:
        return
    chain.mismatches.append(
        {
            "child": str(child.path),
            "parent": str(parent.weights_file),
            "recorded_sha256": recorded,
            "found_sha256": found,
        }
    )
    if not chain.allow_lineage_mismatch:
        raise MergeInputError(
            f"{parent.weights_file}: sha256 {found[:12]}… differs from the parent_sha256 "
            f"{recorded[:12]}… recorded in {child.path / 'emomerge.json'} (the parent changed after "
            "its child was trained; pass --allow-lineage-mismatch to merge anyway)"
        )


def _pool_index(parent_dir: Path, child: LoraAdapter, chain: _Chain) -> int:
    if parent_dir in chain.index_of:
        return chain.index_of[parent_dir]
    if not parent_dir.exists():
        raise MergeInputError(
            f"{child.path / 'emomerge.json'}: lineage parent '{child.metadata.lineage.parent}' "
            f"not found at {parent_dir} (chained task vectors need every ancestor adapter)"
        )
    chain.pool.append(load_adapter(parent_dir, allow_pickle=chain.allow_pickle))
    chain.index_of[parent_dir] = len(chain.pool) - 1
    return len(chain.pool) - 1


def _parent_index(idx: int, pool, index_of) -> int | None:
    adapter = pool[idx]
    if adapter.metadata is None or adapter.metadata.lineage.mode is None:
        return None
    parent_dir = resolve_parent(adapter.path, adapter.metadata)
    return index_of.get(parent_dir) if parent_dir is not None else None


def build_task_vectors(
    paths: list[str | Path],
    *,
    reference: str = "base",
    allow_pickle: bool = False,
    allow_base_mismatch: bool = False,
    base_flavour: str | None = None,
    base_name: str | None = None,
    allow_lineage_mismatch: bool = False,
) -> TaskVectors:
    """Read the adapters, follow their lineage and check everything before any merge work.

    ``allow_base_mismatch``: adapters recorded on different bases are merged anyway (the user
    says they are the same weights: ``--allow-different-bases``). ``base_flavour``: the VLM layout family of the base checkpoint (when one is given), used to
    decide what an ambiguous ``model.layers.N`` adapter is. ``base_name``: identity to check the
    adapters against (besides each other). Every lineage link read is checked against the
    ``parent_sha256`` the child recorded (``allow_lineage_mismatch``: go on, listed in
    ``lineage_mismatches``).
    """
    if reference not in ("base", "previous"):
        raise MergeInputError(f"--reference must be 'base' or 'previous', got {reference!r}")
    if not paths:
        raise MergeInputError("no adapters given")
    inputs = [load_adapter(p, allow_pickle=allow_pickle) for p in paths]
    resolved = [a.path.resolve() for a in inputs]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p in resolved if resolved.count(p) > 1)
        raise MergeInputError(f"{dup}: the same adapter is given twice")
    if reference == "previous":
        _check_lineage_recorded(inputs)
    chain = _Chain(
        list(inputs),
        {p: i for i, p in enumerate(resolved)},
        allow_pickle,
        allow_missing_continued=reference == "base",
        allow_lineage_mismatch=allow_lineage_mismatch,
    )
    pool, index_of = chain.pool, chain.index_of

    combos: list[Combo] = []
    for i in range(len(inputs)):
        u_i = _cumulative(i, chain)
        p = _parent_index(i, pool, index_of) if reference == "previous" else None
        if p is not None:
            diff: Combo = defaultdict(float, u_i)
            for j, c in _cumulative(p, chain).items():
                diff[j] -= c
            u_i = {j: c for j, c in diff.items() if c != 0.0}
        combos.append(dict(u_i))

    _check_bases(pool, allow_base_mismatch, base_name)
    _resolve_layouts(pool, base_flavour)
    shapes = _check_shapes(pool)
    for adapter in pool:
        check_finite(adapter)
    used = {j for combo in combos for j in combo}
    modules = sorted({m for j in used for m in pool[j].modules}, key=_natural_key)
    return TaskVectors(
        inputs,
        pool,
        combos,
        reference,
        modules,
        {m: shapes[m] for m in modules},
        lineage_mismatches=chain.mismatches,
        lineage_assumed=chain.assumed,
        lineage_missing=[str(a.path) for a in pool if a.metadata is None],
    )


def _check_lineage_recorded(inputs: list[LoraAdapter]) -> None:
    """``--reference previous`` needs every input's parent: an adapter without a lineage
    ``emomerge.json`` (trained elsewhere) would silently become base-relative, so it is refused.
    A first stage records ``parent: null``; a merge output (its manifest) has no lineage."""
    for adapter in inputs:
        if adapter.metadata is None:
            raise MergeInputError(
                f"{adapter.path}: no lineage (emomerge.json of a training stage), and --reference "
                f"previous needs its parent stage; record it with `emomerge lineage set "
                f"{adapter.path} --parent PARENT --mode continued|stacked` (without --parent: a "
                "first stage trained on the base)"
            )


def _natural_key(path: str):
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def _check_bases(pool: list[LoraAdapter], allow: bool, base_name: str | None) -> None:
    if allow:
        return
    named = [(a, base_identity(a.base_name)) for a in pool if base_identity(a.base_name)]
    if base_name and named:
        want = base_identity(base_name)
        # A local base folder is often renamed; only compare when the base folder names a model.
        for adapter, ident in named:
            if want != ident and not Path(base_name).is_dir():
                raise MergeInputError(
                    f"{adapter.path}: trained on '{adapter.base_name}', not on the base "
                    f"'{base_name}' (pass --allow-different-bases if they are the same weights)"
                )
    if len({ident for _, ident in named}) > 1:
        first, ident0 = named[0]
        other = next(a for a, ident in named if ident != ident0)
        raise MergeInputError(
            f"{other.path}: trained on '{other.base_name}' but {first.path} on "
            f"'{first.base_name}' (pass --allow-different-bases if they are the same weights)"
        )


def _resolve_layouts(pool: list[LoraAdapter], base_flavour: str | None) -> None:
    hint = base_flavour
    if hint is None and any(name_suggests_vlm(a.base_name) for a in pool):
        hint = "qwen-legacy"
    for adapter, layout in zip(pool, resolve_plain([a.layout for a in pool], vlm_hint=hint)):
        adapter.relayout(layout)


def _check_shapes(pool: list[LoraAdapter]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, LoraAdapter] = {}
    for adapter in pool:
        for path, mod in adapter.modules.items():
            if path in shapes and shapes[path] != mod.shape:
                raise MergeInputError(
                    f"{adapter.weights_file}: module '{path}' updates a {list(mod.shape)} weight "
                    f"but {owner[path].weights_file} a {list(shapes[path])} one (different bases?)"
                )
            shapes.setdefault(path, mod.shape)
            owner.setdefault(path, adapter)
    return shapes
