"""Every merge method against a plain dense reference written here from the formulas.

Adapters have mixed ranks, rank/alpha patterns and rsLoRA; the reference works on the dense ΔW
the test itself computed when writing them (float64, numpy sorting for trimming).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging import merge
from emomerge.merging import methods as M

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=2, hidden=16, inter=24)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    dense = [
        write_adapter(root / "a", SHAPES, r=4, alpha=8, seed=1),
        write_adapter(
            root / "b",
            SHAPES,
            r=8,
            alpha=16,
            seed=2,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 3.0},
        ),
        write_adapter(root / "c", SHAPES, r=6, alpha=6, rslora=True, seed=3),
    ]
    base = write_base(root / "base", SHAPES)
    return root, dense, base


# -- plain references ------------------------------------------------------------------------
def ref_trim(t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return t
    k = max(1, int(density * t.size))
    order = np.argsort(-np.abs(t).ravel(), kind="stable")
    out = np.zeros(t.size)
    out[order[:k]] = t.ravel()[order[:k]]
    return out.reshape(t.shape)


def ref_breadcrumbs(t, density, gamma):
    n = t.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(t).ravel(), kind="stable")
    out = np.zeros(n)
    keep = order[n_bot : n_bot + target]
    out[keep] = t.ravel()[keep]
    return out.reshape(t.shape)


def ref_ties_mix(trimmed, w, normalize, lam):
    weighted = [wi * t for wi, t in zip(w, trimmed)]
    total = sum(weighted)
    elected = np.where(total >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in weighted]
    mixed = sum(x * a for x, a in zip(weighted, agree))
    div = sum(wi * a for wi, a in zip(w, agree))
    div = np.where(div == 0, 1.0, div)
    return (mixed / div if normalize else mixed) * lam


def reference(method, taus, w, p):
    lam = p.get("lambda", 1.0)
    if method == "linear":
        s = sum(wi * t for wi, t in zip(w, taus))
        return s / sum(w) if p.get("normalize", True) else s
    if method == "task_arithmetic":
        return lam * sum(wi * t for wi, t in zip(w, taus))
    if method == "ties":
        trimmed = [ref_trim(t, p["density"]) for t in taus]
        if p.get("paper"):
            total = sum(trimmed)
            elected = np.where(total >= 0, 1.0, -1.0)
            agree = [(np.sign(t) == elected) for t in trimmed]
            count = np.maximum(sum(a.astype(float) for a in agree), 1)
            return lam * sum(wi * t * a for wi, t, a in zip(w, trimmed, agree)) / count
        return ref_ties_mix(trimmed, w, p.get("normalize", True), lam)
    if method == "breadcrumbs":
        kept = [ref_breadcrumbs(t, p["density"], p["gamma"]) for t in taus]
        return lam * sum(wi * t for wi, t in zip(w, kept))
    if method == "breadcrumbs_ties":
        kept = [ref_breadcrumbs(t, p["density"], p["gamma"]) for t in taus]
        return ref_ties_mix(kept, w, False, lam)
    raise AssertionError(method)


CASES = [
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "lambda": 1.3, "normalize": False}),
    ("ties", {"density": 0.4, "paper": True}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.0}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.1}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_full_output_matches_dense_reference(three, tmp_path, method, params):
    root, dense, base = three
    w = [0.5, 1.0, 0.8]
    merge(
        method,
        [root / "a", root / "b", root / "c"],
        tmp_path / "out",
        weights=w,
        params=params,
        output="full",
        base=root / "base",
        dtype="float64",
    )
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(base)
    for path in SHAPES:
        taus = [d[path].numpy() for d in dense]
        expect = base[f"{path}.weight"].double().numpy() + reference(method, taus, w, params)
        got = merged[f"{path}.weight"].double().numpy()
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-6, err_msg=f"{method} {path}")


@pytest.mark.parametrize("method,params", [("linear", {}), ("task_arithmetic", {"lambda": 0.5})])
def test_exact_adapter_output_is_the_dense_merge(three, tmp_path, method, params):
    root, dense, _ = three
    w = [0.2, 0.3, 1.0]
    res = merge(
        method, [root / "a", root / "b", root / "c"], tmp_path / "ad", weights=w, params=params
    )
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    import json

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for path in SHAPES:
        A = tensors[f"base_model.model.{path}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{path}.lora_B.weight"].double()
        r = cfg["rank_pattern"].get(path, cfg["r"])
        alpha = cfg["alpha_pattern"].get(path, cfg["lora_alpha"])
        assert A.shape[0] == r == 4 + 8 + 6 - (6 if "down_proj" in path else 0)
        got = (alpha / r) * (B @ A)
        taus = [d[path].numpy() for d in dense]
        np.testing.assert_allclose(got.numpy(), reference(method, taus, w, params), atol=1e-6)
    assert res.errors == {}


def test_rank_compression_error_matches_svd(three, tmp_path):
    root, dense, _ = three
    res = merge("task_arithmetic", [root / "a", root / "b", root / "c"], tmp_path / "ad", rank=3)
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    path = "model.layers.0.self_attn.q_proj"
    total = sum(d[path] for d in dense)
    s = torch.linalg.svdvals(total)
    best = total - (lambda u, s, vh: (u[:, :3] * s[:3]) @ vh[:3])(*torch.linalg.svd(total))
    A = tensors[f"base_model.model.{path}.lora_A.weight"].double()
    B = tensors[f"base_model.model.{path}.lora_B.weight"].double()
    assert A.shape[0] == 3
    # the compressed product is the best rank-3 approximation (Eckart–Young)
    np.testing.assert_allclose((B @ A - total).norm().item(), best.norm().item(), rtol=1e-6)
    assert res.errors[path] == pytest.approx(
        (s[3:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-5
    )


def test_dare_masks_follow_the_seeded_generators():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 20, 30, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    seeds = [11, 22, 33]
    got = M.dare_ties(
        deltas,
        w,
        density=[0.3, 0.5, 0.9],
        generators=[torch.Generator().manual_seed(s) for s in seeds],
    )
    # reference: same Bernoulli draws, L1 rescale, then TIES mix without normalisation
    kept = []
    for t, d, s in zip(deltas, [0.3, 0.5, 0.9], seeds):
        mask = torch.bernoulli(torch.full_like(t, d), generator=torch.Generator().manual_seed(s))
        x = (t * mask).numpy()
        kept.append(x * (np.abs(t.numpy()).sum() / np.abs(x).sum()))
    expect = ref_ties_mix(kept, w.tolist(), normalize=False, lam=1.0)
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-12)
    # DARE paper rescale: survivors × 1/p
    got_inv = M.dare_linear(
        deltas,
        w,
        density=[0.5] * 3,
        rescale="density",
        generators=[torch.Generator().manual_seed(s) for s in seeds],
    )
    expect_inv = sum(
        wi
        * (
            t
            * torch.bernoulli(torch.full_like(t, 0.5), generator=torch.Generator().manual_seed(s))
            / 0.5
        )
        for wi, t, s in zip(w, deltas, seeds)
    )
    np.testing.assert_allclose(got_inv.numpy(), expect_inv.numpy(), atol=1e-12)


def test_della_probabilities_rise_with_magnitude_rank():
    t = torch.arange(1, 1001, dtype=torch.float64).reshape(1, 1000)
    keep = torch.zeros(1000)
    for s in range(200):
        out = M.della(
            t[None],
            torch.ones(1, dtype=torch.float64),
            density=[0.5],
            epsilon=[0.3],
            generators=[torch.Generator().manual_seed(s)],
            rescale=False,
            normalize=False,
        )
        keep += (out[0] != 0).float()
    rate = keep / 200
    # p = 0.2 at the smallest entry, 0.8 at the largest, linear in rank
    assert rate[:100].mean().item() == pytest.approx(0.2 + 0.6 * 49.5 / 999, abs=0.03)
    assert rate[-100:].mean().item() == pytest.approx(0.2 + 0.6 * 949.5 / 999, abs=0.03)
