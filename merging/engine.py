"""The merge: adapters → task vectors → method → adapter or full weights + manifest.

Streams modules (two at a time on a multi-core machine), so memory is bounded by a few modules'
work, not by the model: sparse methods never hold a dense ΔW per adapter (``streaming``), and
outputs are written tensor by tensor (``output.SafetensorsWriter``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emomerge import __version__

from . import streaming
from .basecheck import check_base_identity
from .checkpoint import Checkpoint
from .errors import MergeInputError
from .lowrank import REFACTORS, compress, concat, refactor, refactor_auto
from .methods import MergeMethod
from .names import from_canonical
from .output import MANIFEST, tied_head, write_adapter_output, write_full_output, write_json
from .params import effective_gamma, resolve_params
from .progress import Bar, phase
from .provenance import software
from .registry import METHODS
from .safeout import check_folder_target, output_folder
from .serving import vllm_max_lora_rank, vllm_note
from .spaces import SPACES
from .taskvectors import TaskVectors, build_task_vectors

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: dtypes the written weights may be stored in (``out_dtype``); merges are computed in DTYPES
OUT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
OUTPUTS = ("adapter", "full")
#: a re-factorised sparse merge whose mean relative error is above this gets a warning
WARN_MEAN_ERROR = 0.10


@dataclass
class MergeResult:
    out: Path
    manifest: dict
    errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        line = f"{m['method']}: {len(m['adapters'])} adapters, {m['n_modules']} modules → {self.out} ({m['output']})"
        if m["output"] == "adapter":
            line += f", rank {m['output_rank_max']}" + vllm_note(
                m["output_rank_max"], modules_to_save=bool(m.get("modules_to_save"))
            )
        else:
            line += ", full weights: serve as a model of its own"
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            mean = sum(self.errors.values()) / len(self.errors)
            line += (
                f"; re-factorised: {_refactor_counts(m.get('refactor', {}))}relative error mean "
                f"{mean:.2%}, max {self.errors[worst]:.2%} ({worst})"
            )
            if m.get("max_error") is not None:
                line += f" [rank auto, max_error {m['max_error']:g}]"
        return line

    def warning(self) -> str | None:
        """One line for stderr when a sparse merge's adapter is far from the merge it names: its
        mean relative error is above ``WARN_MEAN_ERROR`` (not with ``--rank auto``, whose bound
        the user chose). None otherwise."""
        m = self.manifest
        mean = m.get("errors", {}).get("mean", 0.0)
        if (
            m.get("output") != "adapter"
            or not get_method(m["method"]).sparse
            or m.get("max_error") is not None
            or mean <= WARN_MEAN_ERROR
        ):
            return None
        if m.get("recipe") is not None:
            fix = (
                "emomerge.output: full (or --output full --base PATH: exact), a larger emomerge.rank, "
                "or emomerge.rank: auto with emomerge.max_error: E"
            )
        else:
            fix = "--output full --base PATH (exact), a larger --rank, or --rank auto --max-error E"
        return (
            f"warning: the {m['method']} adapter is re-factorised to rank ≤ {m['output_rank_max']} with a "
            f"mean relative error of {mean:.1%} (max {m['errors']['max']:.1%}): it is not the exact "
            f"{m['method']} merge; use {fix}"
        )


def _refactor_counts(how: dict[str, dict]) -> str:
    """ "12 by svd, 2 by projection, " — how the modules were re-factorised, most used first."""
    counts = collections.Counter(info["refactor"] for info in how.values() if "refactor" in info)
    return "".join(f"{c} by {name}, " for name, c in counts.most_common())


def get_method(name: str) -> MergeMethod:
    key = name.replace("-", "_")
    if key not in METHODS:
        raise MergeInputError(f"unknown merge method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[key]


def derive_seed(seed: int, module: str, index: int) -> int:
    """A per-(module, adapter) seed: the same bytes whatever order modules are visited in."""
    digest = hashlib.sha256(f"{seed}:{module}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def apply_method(
    method: MergeMethod, deltas: torch.Tensor, resolved: dict[str, Any], *, seed: int, module: str
) -> torch.Tensor:
    """Run a registered method on ``deltas`` ``[n, *shape]`` with resolved parameters."""
    weights = torch.tensor(resolved["weight"], dtype=deltas.dtype)
    kwargs = {
        ("lambda_" if k == "lambda" else k): v
        for k, v in resolved.items()
        if k not in ("weight", "space")
    }
    if method.random:
        kwargs["generators"] = [
            torch.Generator().manual_seed(derive_seed(seed, module, i))
            for i in range(deltas.shape[0])
        ]
    return method.fn(deltas, weights, **kwargs)


def exact_coefficients(method: MergeMethod, resolved: dict[str, Any], n: int) -> list[float]:
    """c with merged = Σ c_i τ_i, for methods linear in their inputs (run on unit vectors)."""
    basis = torch.eye(n, dtype=torch.float64)  # deltas [n, n]: τ_i = e_i
    return apply_method(method, basis, resolved, seed=0, module="").tolist()


class _MergeBar:
    """The shared display's phase ("merge ties", modules/s, the current module) behind the
    ``add_task`` / ``update(module=)`` / ``advance`` calls the output writers make."""

    def __init__(self, stack: contextlib.ExitStack, enabled: bool) -> None:
        self._stack, self._enabled = stack, enabled
        self._bar = Bar()  # does nothing until add_task

    def add_task(self, description: str, total: int, module: str = "") -> int:
        self._bar = self._stack.enter_context(
            phase(f"merge {description}", total, unit="modules", enabled=self._enabled)
        )
        return 0

    def update(self, task: int, module: str) -> None:
        self._bar.info(module)

    def advance(self, task: int, n: int = 1) -> None:
        self._bar.advance(n)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[_MergeBar]:
    with contextlib.ExitStack() as stack:  # the phase ends with the merge
        yield _MergeBar(stack, enabled)


_AHEAD = 6  # finished modules held for in-order output (one layer's worth)


class _Merger:
    """Computes the merged update of one module at a time."""

    def __init__(
        self,
        method: MergeMethod,
        tv: TaskVectors,
        params: dict,
        *,
        seed: int,
        dtype: torch.dtype,
        rank: int | None,
        saved_base: Checkpoint | None,
        names: dict[str, str],
        max_error: float | None = None,
        out_dtype: torch.dtype | None = None,
        refactor: str = "projection",
    ):
        self.method, self.tv = method, tv
        self.out_dtype = out_dtype  # None: the base's dtype (full), float32 (adapter factors)
        self.seed, self.dtype, self.rank = seed, dtype, rank
        # --rank auto: re-factorised modules get the smallest rank with relative error ≤ max_error
        # (``rank`` is then None; exact low-rank results stay exact)
        self.max_error = max_error
        # fixed rank, streamed sparse merges: the joint-basis projection, or "best" (the better of
        # it and a truncated SVD of the dense merged block)
        self.refactor = refactor
        self.refactored: dict[
            str, dict
        ] = {}  # path → how it was re-factorised (lowrank/streaming info)
        self.saved_base = saved_base
        self.stream_workers: int | None = None  # None: all cores within a module
        # Parameters per module (mergekit filters match the tensor name, e.g. "...q_proj.weight"),
        # all resolved up front so a bad value fails before any work.
        self.table = {
            path: resolve_params(method, tv.n, params, module=names[path]) for path in names
        }

    def coeffs(self, path: str) -> list[float] | None:
        if self.method.sparse:
            return None
        return exact_coefficients(self.method, self.table[path], self.tv.n)

    def _in_space(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge in a LoRA-native space; the result comes back as exact low-rank factors."""
        factors = [self.tv.lowrank(i, path, self.dtype) for i in range(self.tv.n)]
        stacked, back = SPACES[self._space(path)](factors, self.tv.shapes[path])
        merged = apply_method(self.method, stacked, self.table[path], seed=self.seed, module=path)
        return back(merged)

    def _streamed(self, path: str) -> bool:
        """Sparse methods on LoRA factors run block by block (merging/streaming/)."""
        return (
            not self._native(path)
            and self.method.sparse
            and streaming.supports(self.method, self.table[path])
        )

    def _stream_inputs(self, path: str):
        factors = [self.tv.lowrank(i, path, self.dtype) for i in range(self.tv.n)]
        gens = None
        if self.method.random:  # exactly the generators apply_method would build
            gens = [
                torch.Generator().manual_seed(derive_seed(self.seed, path, i))
                for i in range(self.tv.n)
            ]
        return factors, gens

    def _native(self, path: str) -> bool:
        return self._space(path) != "dense"

    def _space(self, path: str) -> str:
        space = self.table[path].get("space", "dense")
        # SVD methods give the same result in core space (they commute with its orthonormal
        # bases), where it is exact low rank and far cheaper: use it for LoRA factors.
        if space == "dense" and self.method.extra.get("core_equivalent"):
            return "core"
        return space

    def dense(self, path: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged update of module ``path``, dense, weight-shaped; computed into ``out``
        (weight-shaped, ``self.dtype``) where the method allows it (a reused buffer saves
        faulting in fresh pages for every module)."""
        if self._native(path):
            left, right = self._in_space(path)
            return left @ right
        coeffs = self.coeffs(path)
        if coeffs is not None:
            total = out if out is not None else torch.empty(self.tv.shapes[path], dtype=self.dtype)
            terms = [
                (f[0], f[1], c)
                for i, c in enumerate(coeffs)
                if c != 0 and (f := self.tv.lowrank(i, path, self.dtype)) is not None
            ]
            if not terms:
                return total.zero_()
            # one product of the concatenated factors: a single pass over the output
            return torch.mm(*concat(terms), out=total)
        if self._streamed(path):
            factors, gens = self._stream_inputs(path)
            return streaming.merge_dense(
                self.method,
                factors,
                self.tv.shapes[path],
                self.table[path],
                generators=gens,
                workers=self.stream_workers,
                out=out,
            )
        deltas = self.tv.stacked(path, self.dtype)
        return apply_method(self.method, deltas, self.table[path], seed=self.seed, module=path)

    def factors(self, path: str) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Low-rank factors of the merged update and the relative error of any truncation."""
        if self._native(path):
            left, right = self._in_space(path)
            if self.rank is not None and self.rank < left.shape[1]:
                return compress(left, right, self.rank)
            return left, right, None
        coeffs = self.coeffs(path)
        if coeffs is not None:
            terms = []
            for i, c in enumerate(coeffs):
                factors = self.tv.lowrank(i, path, self.dtype)
                if factors is not None and c != 0:
                    terms.append((factors[0], factors[1], c))
            if not terms:
                shape = self.tv.shapes[path]
                return (
                    torch.zeros(shape[0], 1, dtype=self.dtype),
                    torch.zeros(1, shape[1], dtype=self.dtype),
                    None,
                )
            left, right = concat(terms)
            if self.rank is not None and self.rank < left.shape[1]:
                return compress(left, right, self.rank)
            return left, right, None
        rank = self.rank or max(
            self.tv.pool[j].modules[path].rank
            for combo in self.tv.combos
            for j in combo
            if path in self.tv.pool[j].modules
        )
        gen = torch.Generator().manual_seed(derive_seed(self.seed, path, -1))
        info: dict = {}
        self.refactored[path] = info
        if self._streamed(path):
            fs, gens = self._stream_inputs(path)
            return streaming.merge_factors(
                self.method,
                fs,
                self.tv.shapes[path],
                self.table[path],
                rank,
                generators=gens,
                refactor_generator=gen,
                workers=self.stream_workers,
                max_error=self.max_error,
                info=info,
                refactor=self.refactor,
            )
        if self.max_error is not None:
            return refactor_auto(self.dense(path), self.max_error, generator=gen, info=info)
        # no joint-basis projection here: the (randomized) SVD of the dense update, either choice
        return refactor(self.dense(path), rank, generator=gen, info=info)

    def factors_in_order(self, paths: Sequence[str]) -> Iterator[tuple[str, tuple]]:
        """``(path, factors(path))`` for each path, in order. With more than one core, modules
        are merged concurrently, one thread each (streamed merges then run single-threaded), so
        one module's serial steps (threshold selection, SVD of the core) overlap another's
        passes. ``workers`` modules run at a time; finished ones wait for their turn in a window
        of ``workers + _AHEAD`` (low-rank factors: small), so a short module finishing behind a
        long one does not leave its core idle."""
        workers = streaming.default_workers()
        if workers <= 1 or len(paths) <= 1:
            for path in paths:
                yield path, self.factors(path)
            return
        self.stream_workers = 1
        try:
            with streaming.single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
                todo = iter(paths)
                pending = collections.deque(
                    (path, pool.submit(self.factors, path))
                    for path in itertools.islice(todo, workers + _AHEAD)
                )
                while pending:
                    path, future = pending.popleft()
                    result = future.result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(self.factors, nxt)))
                    yield path, result
        finally:
            self.stream_workers = None

    def saved_delta(self, name: str) -> torch.Tensor:
        """Merged update of a ``modules_to_save`` tensor: τ_i = W_saved_i − W_base for an input
        that saves it, its LoRA product for one that trains the module as a LoRA instead
        (``absorb_saved_overlaps``), 0 for the others."""
        base_key = self.saved_base.canonical[name]
        base = self.saved_base.tensor(base_key).to(self.dtype)
        path = name.removesuffix(".weight")
        deltas = []
        for i, a in enumerate(self.tv.inputs):
            if name in a.saved:  # PEFT applies the saved copy (a LoRA on it is never used)
                deltas.append(a.tensor(a.saved[name]).to(self.dtype) - base)
                continue
            factors = self.tv.lowrank(i, path, self.dtype) if path != name else None
            deltas.append(torch.zeros_like(base) if factors is None else factors[0] @ factors[1])
        deltas = torch.stack(deltas)
        params = {**self.table[name], "space": "dense"}  # full tensors have no LoRA factors
        return apply_method(self.method, deltas, params, seed=self.seed, module=name)


def merge(
    method: str,
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | None = None,
    output: str = "adapter",
    base: str | Path | None = None,
    rank: int | str | None = None,
    max_error: float | None = None,
    refactor: str = "projection",
    seed: int = 0,
    reference: str = "base",
    dtype: str = "float32",
    out_dtype: str | None = None,
    layout: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int = 2 << 30,
    progress: bool = False,
    recipe: dict | None = None,
    allow_base_mismatch: bool = False,
    allow_lineage_mismatch: bool = False,
    protect: Sequence[str | Path] = (),
) -> MergeResult:
    """Merge stage adapters with a registered method; write ``out`` atomically.

    ``params`` holds the method's parameters by their recipe names (``density``, ``lambda``, …);
    ``weights`` is a shortcut for ``params['weight']``. ``rank="auto"`` with ``max_error`` E gives
    each re-factorised module the smallest rank whose relative Frobenius error is ≤ E (exact
    low-rank results stay exact). ``refactor="best"`` (a fixed rank): each re-factorised sparse
    module keeps the closer of the joint-basis projection and a truncated SVD of its dense merged
    update (slower: one dense merge and SVD per module). Everything is checked (files, bases,
    shapes, finiteness, parameter ranges, lineage hashes) before any tensor is merged or written.

    ``dtype`` is the compute dtype (float32 or float64, never narrower: a bf16 merge would round
    every partial sum); ``out_dtype`` the dtype the written weights are stored in (default: the
    base's own for full output, float32 for adapter factors) — mergekit's ``dtype`` /
    ``out_dtype`` pair, so the exported YAML computes the same thing.

    ``force`` replaces an earlier emomerge output at ``out`` (never an input, never anything
    else: ``safeout``) and means nothing else; ``allow_base_mismatch`` (the CLI's
    ``--allow-different-bases``) merges adapters recorded on different bases. ``protect``:
    further files the command reads (a recipe), which ``out`` must not be.
    """
    m = get_method(method)
    params = dict(params or {})
    if weights is not None:
        params["weight"] = list(weights)
    if output not in OUTPUTS:
        raise MergeInputError(f"--output must be one of {OUTPUTS}, got {output!r}")
    if dtype not in DTYPES:
        raise MergeInputError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise MergeInputError(f"--out-dtype must be one of {list(OUT_DTYPES)}, got {out_dtype!r}")
    _check_rank(rank, max_error)
    _check_refactor(refactor, rank)
    if layout is not None and layout not in ("new", "qwen-legacy", "llava-legacy", "text"):
        raise MergeInputError(
            f"--layout must be new, qwen-legacy, llava-legacy or text, got {layout!r}"
        )
    out = Path(out)
    given_inputs = [*adapters, *([base] if base is not None else []), *protect]
    check_folder_target(out, given_inputs, force=force)
    if output == "full" and base is None:
        raise MergeInputError("--output full needs --base PATH (the base model folder)")
    resolved = resolve_params(m, len(adapters), params)  # names and ranges, before any I/O
    ckpt = Checkpoint(base) if base is not None else None
    tv = build_task_vectors(
        list(adapters),
        reference=reference,
        allow_pickle=allow_pickle,
        allow_base_mismatch=allow_base_mismatch,
        base_flavour=ckpt.vlm_flavour if ckpt else None,
        allow_lineage_mismatch=allow_lineage_mismatch,
    )
    saved = sorted({name for a in tv.inputs for name in a.saved})
    if saved:
        _check_saved(tv, saved, ckpt)
    if ckpt is not None:
        if not allow_base_mismatch:
            check_base_identity(tv.pool, ckpt)
        check_against_base(tv, ckpt, saved)
    absorb_saved_overlaps(tv, saved)
    names = {p: p + ".weight" for p in tv.modules} | {name: name for name in saved}
    auto = rank == "auto"
    merger = _Merger(
        m,
        tv,
        params,
        seed=seed,
        dtype=DTYPES[dtype],
        rank=None if auto else rank,
        saved_base=ckpt,
        names=names,
        max_error=max_error if auto else None,
        out_dtype=OUT_DTYPES[out_dtype] if out_dtype else None,
        refactor=refactor,
    )

    started = _dt.datetime.now(_dt.timezone.utc)
    manifest: dict[str, Any] = {
        "kind": "merge",
        "emomerge_version": __version__,
        "software": software(),  # versions and git_dirty (DESIGN.md, Outputs)
        "method": m.name,
        "params": resolved,
        "params_given": params,
        "seed": seed,
        "reference": reference,
        "output": output,
        "rank": rank,
        "max_error": max_error,
        "refactor_choice": refactor,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "adapters": [_describe(a) for a in tv.inputs],
        "ancestors": [_describe(a) for a in tv.pool[tv.n :]],
        "task_vectors": [{tv.pool[j].name: c for j, c in combo.items()} for combo in tv.combos],
        "base": None
        if ckpt is None
        else {"path": str(ckpt.path), "fingerprint": ckpt.fingerprint(), "layout": ckpt.layout},
        "n_modules": len(tv.modules),
        "recipe": recipe,
        "allow_base_mismatch": allow_base_mismatch,
        "allow_lineage_mismatch": allow_lineage_mismatch,
        "lineage_mismatches": tv.lineage_mismatches,
        "lineage_assumed": tv.lineage_assumed,
        "lineage_missing": tv.lineage_missing,
        "created": started.isoformat(timespec="seconds"),
    }
    if m.param("gamma") is not None:
        manifest["gamma_effective"] = effective_gamma(resolved)
    inputs = [*given_inputs, *(a.path for a in tv.pool)]
    needed = _needed_bytes(tv, ckpt, saved, output, rank)
    with (
        output_folder(out, force=force, inputs=inputs, needed_bytes=needed) as tmp,
        _progress(progress) as bar,
    ):
        task = bar.add_task(f"{m.name}", total=len(tv.modules) + len(saved), module="")
        if output == "adapter":
            errors, out_layout, ranks = write_adapter_output(
                tmp, merger, tv, saved, ckpt, layout, bar, task
            )
            manifest["layout"] = out_layout
            manifest["output_rank_max"] = max(ranks.values(), default=0)
            manifest["vllm_max_lora_rank"] = vllm_max_lora_rank(manifest["output_rank_max"])
            manifest["modules_to_save"] = saved
            if errors and rank is None:
                manifest["rank_rule"] = "largest input rank of each module"
            elif auto:
                manifest["rank_rule"] = f"auto, max_error {max_error:g}"
            manifest["ranks"] = ranks
            if merger.refactored:
                # per module: projection | svd | randomized svd, the basis size and its
                # out-of-span residual (--rank auto: minimality holds within that basis); with
                # --refactor best also the projection's own error (projection_error)
                manifest["refactor"] = {
                    from_canonical(path, out_layout): merger.refactored[path]
                    for path in tv.modules
                    if path in merger.refactored
                }
        else:
            errors = {}
            manifest["untied_lm_head"] = write_full_output(
                tmp, merger, tv, saved, ckpt, max_shard_size, bar, task
            )
            manifest["layout"] = ckpt.layout
        manifest["errors"] = {
            "relative_frobenius": errors,
            "max": max(errors.values(), default=0.0),
            "mean": sum(errors.values()) / len(errors) if errors else 0.0,
        }
        manifest["seconds"] = round(
            (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 3
        )
        write_json(tmp / MANIFEST, manifest)
    return MergeResult(out=out, manifest=manifest, errors=errors)


def _needed_bytes(
    tv: TaskVectors, ckpt: Checkpoint | None, saved: list[str], output: str, rank: int | str | None
) -> int:
    """About how many bytes the output takes (for the message when the disk is full)."""
    if output == "full" and ckpt is not None:
        return sum(ckpt.stored(key).length for file in ckpt.files() for key in ckpt.keys_in(file))
    total = sum(ckpt.stored(ckpt.canonical[name]).length for name in saved) if ckpt else 0
    for path, (rows, cols) in tv.shapes.items():
        r = (
            rank
            if isinstance(rank, int)
            else sum(a.modules[path].rank for a in tv.pool if path in a.modules)
        )
        total += 4 * r * (rows + cols)
    return total


def _check_rank(rank: int | str | None, max_error: float | None) -> None:
    if isinstance(rank, str):
        if rank != "auto":
            raise MergeInputError(f"--rank must be a positive integer or auto, got {rank!r}")
        if max_error is None:
            raise MergeInputError(
                "--rank auto needs --max-error E (the largest relative Frobenius error per module, in (0, 1))"
            )
    elif rank is not None and (isinstance(rank, bool) or rank < 1):
        raise MergeInputError(f"--rank must be a positive integer, got {rank}")
    if max_error is not None:
        if rank != "auto":
            raise MergeInputError(
                "--max-error needs --rank auto (with a fixed --rank the error is only reported)"
            )
        if (
            isinstance(max_error, bool)
            or not isinstance(max_error, (int, float))
            or not (math.isfinite(max_error) and 0 < max_error < 1)
        ):
            raise MergeInputError(f"--max-error must be a number in (0, 1), got {max_error!r}")


def _check_refactor(refactor: str, rank: int | str | None) -> None:
    if refactor not in REFACTORS:
        raise MergeInputError(f"--refactor must be projection or best, got {refactor!r}")
    if refactor == "best" and rank == "auto":
        raise MergeInputError(
            "--refactor best needs a fixed --rank: --rank auto already picks the projection or the "
            "SVD per module"
        )


def _describe(adapter) -> dict:
    meta = adapter.metadata
    config = adapter.path / "adapter_config.json"
    return {
        "path": str(adapter.path),
        "sha256": adapter.sha256,
        # the LoRA scale lives in the config: exact evaluation re-checks it (merging/updates.py)
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()
        if config.is_file()
        else None,
        "base": adapter.base_name,
        "layout": adapter.layout,
        "stage": meta.stage if meta else None,
        "lineage": meta.lineage.model_dump() if meta else None,
    }


def _check_saved(tv: TaskVectors, saved: list[str], ckpt: Checkpoint | None) -> None:
    owner = next(a for a in tv.inputs if a.saved)
    if ckpt is None:
        raise MergeInputError(
            f"{owner.weights_file}: has full modules_to_save tensors ({', '.join(saved[:3])}); "
            "their task vectors need the base weights: pass --base PATH"
        )
    if any(a.saved for a in tv.pool[tv.n :]) or any(
        len(combo) > 1 and any(tv.pool[j].saved for j in combo) for combo in tv.combos
    ):
        raise MergeInputError(
            f"{owner.weights_file}: modules_to_save tensors in a lineage chain are not supported"
        )
    for name in saved:
        if name not in ckpt.canonical:
            raise MergeInputError(
                f"{owner.weights_file}: saved tensor '{name}' is not in the base {ckpt.path}"
            )


def absorb_saved_overlaps(tv: TaskVectors, saved: list[str]) -> list[str]:
    """Modules one input trains as a LoRA and another saves whole (``modules_to_save``).

    Each is merged once, as a full tensor (``_Merger.saved_delta``): left in ``tv.modules`` it
    would also be merged as a LoRA and updated twice. Its paths leave ``tv.modules`` and
    ``tv.shapes`` (no LoRA factors are written for it; ``tv.lowrank`` still gives its products).
    Call after ``check_against_base``, which checks their shapes.
    """
    both = [path for path in tv.modules if path + ".weight" in saved]
    for path in both:
        tv.modules.remove(path)
        del tv.shapes[path]
    return both


def check_against_base(tv: TaskVectors, ckpt: Checkpoint, saved: list[str]) -> None:
    tied = tied_head(ckpt, tv.modules)
    for path in tv.modules:
        key = ckpt.canonical.get(path + ".weight")
        if key is None and tied is not None and path == "lm_head":
            key = tied[1]  # a tied head: the embedding is its weight
        if key is None:
            owner = next(a for a in tv.pool if path in a.modules)
            raise MergeInputError(
                f"{owner.weights_file}: module '{path}' has no weight in the base {ckpt.path} "
                f"(base layout {ckpt.layout}; different model?)"
            )
        if tuple(ckpt.shape(key)) != tuple(tv.shapes[path]):
            raise MergeInputError(
                f"{ckpt.path}: '{key}' is {list(ckpt.shape(key))} but the adapters update a "
                f"{list(tv.shapes[path])} weight (different base?)"
            )
