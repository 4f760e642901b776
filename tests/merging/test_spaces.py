"""Core space: lossless projection and agreement with dense merges where they must agree."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from emomerge.merging import build_task_vectors, merge
from emomerge.merging.spaces import core_project

from .helpers import lm_modules, write_adapter

SHAPES = lm_modules(layers=1, hidden=16, inter=24)


def test_core_projection_is_lossless():
    g = torch.Generator().manual_seed(0)
    factors = [
        (
            torch.randn(40, r, generator=g, dtype=torch.float64),
            torch.randn(r, 30, generator=g, dtype=torch.float64),
        )
        for r in (2, 5, 3)
    ]
    cores, back = core_project(factors, (40, 30))
    assert cores.shape == (3, 10, 10)
    for (L, R), core in zip(factors, cores):
        left, right = back(core)  # U_B · M_i · V_Aᵀ
        torch.testing.assert_close(left @ right, L @ R, rtol=0, atol=1e-12)


def test_core_task_arithmetic_equals_dense_and_core_ties_is_low_rank(tmp_path):
    dense = [write_adapter(tmp_path / n, SHAPES, seed=i, r=3 + i) for i, n in enumerate("abc")]
    paths = [tmp_path / n for n in "abc"]
    merge(
        "task_arithmetic",
        paths,
        tmp_path / "core",
        weights=[0.5, 1, 2],
        params={"space": "core"},
        dtype="float64",
    )
    t = load_file(str(tmp_path / "core" / "adapter_model.safetensors"))
    for path in SHAPES:
        got = (
            t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
        expect = 0.5 * dense[0][path] + dense[1][path] + 2 * dense[2][path]
        np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=1e-6)
    res = merge("ties", paths, tmp_path / "cties", params={"space": "core", "density": 0.5})
    assert res.errors == {}  # exact low rank: no refactorisation
    t = load_file(str(tmp_path / "cties" / "adapter_model.safetensors"))
    assert t[f"base_model.model.{next(iter(SHAPES))}.lora_A.weight"].shape[0] <= 3 + 4 + 5
    # reference: TIES written plainly on the cores U_Bᵀ τ_i V_A, mapped back
    tv = build_task_vectors(paths)
    path = next(iter(SHAPES))
    Ls = [tv.lowrank(i, path, torch.float64) for i in range(3)]
    U = torch.linalg.svd(torch.cat([L for L, _ in Ls], 1), full_matrices=False).U
    V = torch.linalg.svd(torch.cat([R for _, R in Ls], 0), full_matrices=False).Vh.T
    cores = [(U.T @ L @ R @ V).numpy() for L, R in Ls]
    trimmed = []
    for c in cores:
        k = int(0.5 * c.size)
        keep = np.argsort(-np.abs(c).ravel(), kind="stable")[:k]
        z = np.zeros(c.size)
        z[keep] = c.ravel()[keep]
        trimmed.append(z.reshape(c.shape))
    elected = np.where(sum(trimmed) >= 0, 1, -1)
    agree = [np.sign(x) == elected for x in trimmed]
    div = sum(a.astype(float) for a in agree)
    merged = sum(x * a for x, a in zip(trimmed, agree)) / np.where(div == 0, 1, div)
    expect = U.numpy() @ merged @ V.numpy().T
    got = (
        t[f"base_model.model.{path}.lora_B.weight"].double()
        @ t[f"base_model.model.{path}.lora_A.weight"].double()
    )
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)
