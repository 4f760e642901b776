"""``--rank auto --max-error E``: every re-factorised module's relative Frobenius error is ≤ E,
and its rank is minimal — checked against dense references written here.

Reference: ΔW = ``engine.apply_method`` on the stacked dense task vectors (float64, from the
helpers' PEFT definition), the output read back from ``adapter_model.safetensors`` (B @ A; the
output's scale is 1), the optimal errors from ``torch.linalg.svd`` of that ΔW (Eckart–Young).

What is true of the rank k (merging/lowrank.py's docstring):
- exact SVD ("svd"): k is the SVD minimum — at k − 1 the truncated SVD's error exceeds E;
- a basis Q (adapters' joint column space, "projection"; randomized, "randomized svd") with
  out-of-span residual ρ ≤ E/2: k is minimal within the basis, and at k − 1 even the truncated
  SVD's error exceeds √(E² − ρ²) ≥ √¾·E (Ky Fan) — the projection's ρ and its within-basis
  errors are recomputed here from the task vectors' column spaces.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging import merge
from emomerge.merging.engine import apply_method, get_method, resolve_params
from emomerge.merging.lowrank import refactor_auto

from .helpers import PREFIX, write_adapter

# q_proj: the joint basis (Σr = 9) is < min/2 = 32 → projection tried; its randomized start (32)
# is ≥ 32 → exact SVD. down_proj: randomized SVD possible (32 < 40). v_proj: small, exact SVD.
SHAPES = {
    "model.layers.0.self_attn.q_proj": (64, 96),
    "model.layers.0.self_attn.v_proj": (8, 12),
    "model.layers.0.mlp.down_proj": (80, 160),
}
RANKS = (2, 3, 4)
TOL = 1e-6  # float32 storage of the written factors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    dense = [write_adapter(root / f"a{i}", SHAPES, seed=10 + i, r=r) for i, r in enumerate(RANKS)]
    return root, [root / f"a{i}" for i in range(len(RANKS))], dense


def reference(
    method: str, params: dict, dense: list[dict], path: str, seed: int = 0
) -> torch.Tensor:
    m = get_method(method)
    resolved = resolve_params(m, len(dense), params)
    return apply_method(m, torch.stack([d[path] for d in dense]), resolved, seed=seed, module=path)


def read_back(out) -> dict[str, torch.Tensor]:
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    return {
        path: tensors[f"{PREFIX}{path}.lora_B.weight"].double()
        @ tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        for path in SHAPES
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def svd_errors(d: torch.Tensor) -> list[float]:
    """Relative error of the best rank-j approximation, j = 0 … rank (Eckart–Young)."""
    s2 = torch.linalg.svd(d).S.square()
    total = float(s2.sum())
    return [math.sqrt(max(0.0, float(s2[j:].sum())) / total) for j in range(s2.numel() + 1)]


def joint_basis(dense: list[dict], path: str) -> torch.Tensor:
    """Orthonormal basis of the task vectors' joint column space (= span of the LoRA B factors)."""
    u, s, _ = torch.linalg.svd(torch.cat([d[path] for d in dense], dim=1), full_matrices=False)
    return u[:, s > s[0] * 1e-8]


CASES = [
    # method, params, E, the re-factorisations this case must exercise
    ("ties", {"density": 0.5, "weight": [0.5, 0.5, 1.0]}, 0.3, {"svd"}),
    ("ties", {"density": 0.95}, 0.5, {"svd", "randomized svd"}),
    ("dare_linear", {"density": 0.97}, 0.5, {"projection", "svd"}),
    ("breadcrumbs", {"density": 0.9}, 0.2, {"svd", "randomized svd"}),
    ("dare_ties", {"density": 0.7}, 0.1, {"svd"}),
    ("della", {"density": 0.7, "epsilon": 0.1}, 0.25, {"svd"}),
]


@pytest.mark.parametrize("method,params,E,kinds", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_every_module_within_max_error_at_a_minimal_rank(
    inputs, tmp_path, method, params, E, kinds
):
    _, adapters, dense = inputs
    res = merge(
        method, adapters, tmp_path / "m", params=params, rank="auto", max_error=E, dtype="float64"
    )
    man = json.loads((tmp_path / "m" / "emomerge.json").read_text())
    assert (
        man["rank"] == "auto"
        and man["max_error"] == E
        and man["rank_rule"] == f"auto, max_error {E:g}"
    )
    got = read_back(tmp_path / "m")
    assert {man["refactor"][p]["refactor"] for p in SHAPES} == kinds
    for path in SHAPES:
        d = reference(method, params, dense, path)
        k = man["ranks"][path]
        err = rel(got[path], d)
        assert got[path].shape == d.shape and torch.linalg.matrix_rank(got[path]) <= k
        assert err <= E + TOL, (path, err)
        assert err == pytest.approx(man["errors"]["relative_frobenius"][path], abs=TOL)
        assert res.errors[path] == man["errors"]["relative_frobenius"][path]
        opt = svd_errors(d)
        assert opt[k] <= err + TOL  # nothing beats the SVD (a check of the reported error)
        how = man["refactor"][path]
        if how["refactor"] == "svd":
            assert opt[k - 1] > E, (path, k, opt[k - 1])  # the SVD's minimum
            continue
        rho = how["out_of_span"]
        assert rho <= E / 2
        assert opt[k - 1] > math.sqrt(E**2 - rho**2) >= math.sqrt(0.75) * E
        if how["refactor"] == "projection":
            q = joint_basis(dense, path)
            assert q.shape[1] == how["basis"] == sum(RANKS)
            pd = q @ (q.T @ d)
            assert rho == pytest.approx(rel(pd, d), abs=1e-6)
            # minimal within the basis: ρ² + the in-basis tail at k − 1 exceeds E
            s2 = torch.linalg.svd(pd).S.square() / float(torch.linalg.matrix_norm(d)) ** 2
            assert math.sqrt(rho**2 + float(s2[k - 1 :].sum())) > E
            assert math.sqrt(rho**2 + float(s2[k:].sum())) == pytest.approx(err, abs=TOL)
    assert man["errors"]["max"] <= E + TOL
    assert res.warning() is None  # the user chose the bound


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_low_rank_methods_stay_exact(inputs, tmp_path, method):
    _, adapters, dense = inputs
    params = {"weight": [0.3, 0.3, 1.0]}
    res = merge(method, adapters, tmp_path / "m", params=params, rank="auto", max_error=0.2)
    got = read_back(tmp_path / "m")
    w = torch.tensor(params["weight"], dtype=torch.float64)
    for path in SHAPES:
        expect = sum(wi * di[path] for wi, di in zip(w, dense))
        if method == "linear":
            expect = expect / w.sum()
        torch.testing.assert_close(got[path], expect, atol=1e-6, rtol=1e-5)
        assert res.manifest["ranks"][path] == sum(RANKS)  # the exact concatenation
    assert res.errors == {} and res.manifest["errors"]["max"] == 0.0
    assert "refactor" not in res.manifest


def test_sparse_without_auto_keeps_the_input_rank(inputs, tmp_path):
    """Without --rank auto nothing changes: the largest input rank, the error only reported."""
    _, adapters, dense = inputs
    res = merge("ties", adapters, tmp_path / "m", params={"density": 0.5}, dtype="float64")
    assert set(res.manifest["ranks"].values()) == {max(RANKS)}
    assert res.manifest["rank_rule"] == "largest input rank of each module"
    got = read_back(tmp_path / "m")
    for path in SHAPES:
        d = reference("ties", {"density": 0.5}, dense, path)
        assert rel(got[path], d) == pytest.approx(res.errors[path], abs=TOL)


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize("E", [0.3, 0.1, 0.02])
def test_refactor_auto_randomized(E):
    """A 300×400 matrix of decaying spectrum: the randomized basis (doubled until ρ ≤ E/2)."""
    s = 0.85 ** torch.arange(200, dtype=torch.float64)
    d = spectrum_matrix(300, 400, s, seed=1).float()
    info: dict = {}
    left, right, err = refactor_auto(d, E, generator=torch.Generator().manual_seed(0), info=info)
    k = left.shape[1]
    assert info["refactor"] == "randomized svd" and info["out_of_span"] <= E / 2
    measured = rel(left.double() @ right.double(), d.double())
    assert measured == pytest.approx(err, abs=1e-6) and err <= E
    opt = svd_errors(d.double())
    assert opt[k - 1] > math.sqrt(E**2 - info["out_of_span"] ** 2)
    k_opt = next(j for j, e in enumerate(opt) if e <= E)
    assert k == k_opt  # with this clean spectrum the power iterations find the SVD's rank


def test_refactor_auto_exact_svd_and_zero():
    d = spectrum_matrix(
        40, 30, torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64), seed=2
    )
    left, right, err = refactor_auto(d, 0.2)
    # ‖tail‖ / ‖D‖ with the singular values above: rank 3 leaves √(0.26)/√14.26 = 0.135 ≤ 0.2,
    # rank 2 leaves √1.26/√14.26 = 0.297 > 0.2
    assert left.shape[1] == 3
    assert err == pytest.approx(math.sqrt(0.26 / 14.26), rel=1e-9)
    left, right, err = refactor_auto(torch.zeros(6, 5), 0.1)
    assert left.shape == (6, 1) and right.shape == (1, 5) and err == 0.0
    assert not left.any() and not right.any()
