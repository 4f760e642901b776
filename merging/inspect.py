"""What a researcher looks at before choosing a method: per-adapter facts and task-vector geometry.

Norms and inner products of task vectors are computed from the factors, never densely:
⟨L₁R₁, L₂R₂⟩_F = trace((L₁ᵀL₂)(R₂R₁ᵀ)), an r×r product per module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .serving import vllm_max_lora_rank
from .taskvectors import TaskVectors, build_task_vectors


def output_ranks(tv: TaskVectors) -> dict:
    """The rank of a merged adapter of these task vectors, largest over modules: exact linear /
    task arithmetic concatenate every τᵢ's terms (Σ over inputs and their lineage terms); sparse
    methods re-factorise to the largest input rank (their default ``--rank``)."""
    exact = sparse = 0
    for path in tv.modules:
        terms = [
            tv.pool[j].modules[path].rank
            for combo in tv.combos
            for j in combo
            if path in tv.pool[j].modules
        ]
        exact, sparse = max(exact, sum(terms)), max(sparse, max(terms, default=0))
    return {
        "exact_linear": exact,
        "sparse_default": sparse,
        "vllm_max_lora_rank": {
            "exact_linear": vllm_max_lora_rank(exact),
            "sparse_default": vllm_max_lora_rank(sparse),
        },
    }


def short_paths(paths: list[str]) -> tuple[str, list[str]]:
    """(common root, each path relative to it): what tells the adapters apart in a narrow table.

    ``runs/demo/adapters/emoart``, ``runs/demo/adapters/emid`` → (``runs/demo/adapters``,
    [``emoart``, ``emid``]). One path, or paths without a common folder: their own parent / as
    given (root ``""``)."""
    import os

    if not paths:
        return "", []
    parts = [Path(p).parts for p in paths]
    common = 0
    while all(len(q) > common + 1 for q in parts) and len({q[common] for q in parts}) == 1:
        common += 1  # never the last part: every short name keeps at least the folder's own name
    if common == 0:
        return "", list(paths)
    root = os.path.join(*parts[0][:common])
    return root, [os.path.join(*q[common:]) for q in parts]


def _inner(f1, f2) -> float:
    (l1, r1), (l2, r2) = f1, f2
    return float(torch.trace((l1.T @ l2) @ (r2 @ r1.T)))


def inspect_adapters(
    paths: list[str | Path],
    *,
    reference: str = "base",
    allow_base_mismatch: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """A JSON-ready report: per adapter base, layout, modules, ranks, scales, norms, lineage;
    pairwise cosine similarities of the task vectors."""
    # a changed lineage parent is shown, not refused: inspect is where one looks for it
    tv = build_task_vectors(
        list(paths),
        reference=reference,
        allow_pickle=allow_pickle,
        allow_base_mismatch=allow_base_mismatch,
        allow_lineage_mismatch=True,
    )
    changed = {m["child"] for m in tv.lineage_mismatches}
    n = tv.n
    gram = torch.zeros(n, n, dtype=torch.float64)
    per_module_norms: list[dict[str, float]] = [{} for _ in range(n)]
    for path in tv.modules:
        factors = [tv.lowrank(i, path, torch.float64) for i in range(n)]
        for i in range(n):
            if factors[i] is None:
                continue
            for j in range(i, n):
                if factors[j] is None:
                    continue
                value = _inner(factors[i], factors[j])
                gram[i, j] += value
                if i != j:
                    gram[j, i] += value
                else:
                    per_module_norms[i][path] = value**0.5
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = gram / torch.outer(norms, norms).clamp_min(1e-300)
    report = {
        "reference": reference,
        "adapters": [],
        "cosine": cosine.tolist(),
        "lineage_mismatches": tv.lineage_mismatches,
        "lineage_assumed": tv.lineage_assumed,
        "lineage_missing": tv.lineage_missing,
        "output_rank": output_ranks(tv),
    }
    for i, adapter in enumerate(tv.inputs):
        ranks = sorted({m.rank for m in adapter.modules.values()})
        scales = sorted({round(m.scale, 6) for m in adapter.modules.values()})
        meta = adapter.metadata
        top = sorted(per_module_norms[i].items(), key=lambda kv: -kv[1])[:3]
        report["adapters"].append(
            {
                "path": str(adapter.path),
                "base": adapter.base_name,
                "layout": adapter.layout,
                "modules": len(adapter.modules),
                "saved_tensors": sorted(adapter.saved),
                "ranks": ranks,
                "scales": scales,
                "rslora": bool(adapter.config.get("use_rslora")),
                "task_vector_norm": float(norms[i]),
                "largest_modules": [{"module": k, "norm": v} for k, v in top],
                "lineage": None
                if meta is None
                else {
                    "stage": meta.stage,
                    "mode": meta.lineage.mode,
                    "parent": meta.lineage.parent,
                    # False: the parent on disk is not the one this adapter was trained on
                    "parent_sha256_ok": (
                        None
                        if not meta.lineage.parent_sha256 or meta.lineage.mode is None
                        else str(adapter.path) not in changed
                    ),
                },
                "task_vector": {tv.pool[j].name: c for j, c in tv.combos[i].items()},
            }
        )
    return report
