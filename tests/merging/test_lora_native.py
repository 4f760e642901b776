"""LoRA-native merging: the KnOTS space and the SVD methods (TSV-Merge, Iso-C, Iso-CTS).

Every number is checked against a plain numpy float64 implementation written here from the
papers' equations (and, where the papers leave a choice open, their reference code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import METHODS, MergeInputError, merge
from emomerge.merging.recipe import Recipe, export_mergekit
from emomerge.merging.spaces import SPACES, knots_project
from emomerge.merging.svd_methods import iso_c, iso_cts, tsv

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=1, hidden=16, inter=24)  # v_proj is 8 × 16: Σr = 9 > 8 there
RANKS = (2, 3, 4)
WEIGHTS = [1.0, 0.5, 2.0]
KEY = "base_model.model.{}.lora_{}.weight"


# -- numpy references from the papers --------------------------------------------------------
def svd(x):
    return np.linalg.svd(x, full_matrices=False)


def polar(x):
    """Orthogonal Procrustes: the nearest matrix with orthonormal columns, P Qᵀ for x = P S Qᵀ."""
    p, _, qt = svd(x)
    return p @ qt


def ref_tsv(taus, ks, alpha=1.0):
    """TSV-Merge (Gargiulo et al. 2025): top-k_i triplets of each τ_i, Û, V̂ orthogonalised."""
    us, ss, vs = [], [], []
    for tau, k in zip(taus, ks):
        u, s, vt = svd(tau)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    return alpha * polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def ref_iso_c(taus, rank, alpha=1.0):
    """Iso-C (Marczak et al. 2025, §4): Δ_TA = Σ τ_i = U Σ Vᵀ → α · mean(σ) · U Vᵀ."""
    u, s, vt = svd(sum(taus))
    return alpha * s[:rank].mean() * u[:, :rank] @ vt[:rank]


def ref_cts_split(rank, n, f):
    """The reference code's sizes: common ⌊R·f⌋, task part rounded to a multiple of n."""
    common = int(rank * f)
    task_total = round((rank - common) / n) * n
    return rank - task_total, task_total // n


def ref_iso_cts(taus, rank, f=0.8, alpha=1.0):
    """Iso-CTS (Marczak et al. 2025, §4): common top-k of Δ_TA + top-s of each τ_i outside it."""
    common, per_task = ref_cts_split(rank, len(taus), f)
    u, s, vt = svd(sum(taus))
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    for tau in taus:
        ut, st, vtt = svd(tau - u[:, :common] @ (u[:, :common].T @ tau))
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vs.append(vtt[:per_task].T)
    return alpha * np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.hstack(vs)).T


def ref_knots(taus):
    """KnOTS (Stoica et al. 2025): [τ_1 … τ_n] = U Σ [V_1ᵀ … V_nᵀ]; blocks Σ V_iᵀ (s_on_V)."""
    joint = np.hstack(taus)
    k = np.linalg.matrix_rank(joint)
    u, s, vt = svd(joint)
    return u[:, :k], np.split(s[:k, None] * vt[:k], len(taus), axis=1)


def ref_ties(blocks, weights, density):
    """TIES with mergekit's weighting: trim, weight, elect sign of the sum, agreeing weighted mean."""
    trimmed = []
    for b in blocks:
        keep = np.argsort(-np.abs(b).ravel(), kind="stable")[: int(density * b.size)]
        z = np.zeros(b.size)
        z[keep] = b.ravel()[keep]
        trimmed.append(z.reshape(b.shape))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    elected = np.where(sum(weighted) >= 0, 1, -1)
    agree = [np.sign(x) == elected for x in weighted]
    div = sum(w * a for w, a in zip(weights, agree))
    return sum(x * a for x, a in zip(weighted, agree)) / np.where(div == 0, 1, div)


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    dense = [write_adapter(root / f"a{i}", SHAPES, seed=10 + i, r=r) for i, r in enumerate(RANKS)]
    base = write_base(root / "base", SHAPES)
    return root, [root / f"a{i}" for i in range(len(RANKS))], dense, base


def full_update(world, out, method, params):
    """Merged update per module, read back from a full-weights merge (float64 math, float32 file)."""
    root, paths, _, base = world
    merge(
        method,
        paths,
        out,
        weights=WEIGHTS,
        params=params,
        output="full",
        base=root / "base",
        dtype="float64",
    )
    t = load_file(str(out / "model.safetensors"))
    return {p: (t[f"{p}.weight"].double() - base[f"{p}.weight"].double()).numpy() for p in SHAPES}


def adapter_update(out):
    t = load_file(str(out / "adapter_model.safetensors"))
    return {
        p: (t[KEY.format(p, "B")].double() @ t[KEY.format(p, "A")].double()).numpy() for p in SHAPES
    }


def weighted_taus(dense, path):
    return [w * d[path].numpy() for w, d in zip(WEIGHTS, dense)]


def random_factors(seed, ranks=RANKS, shape=(40, 30)):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(shape[0], r, generator=g, dtype=torch.float64),
            torch.randn(r, shape[1], generator=g, dtype=torch.float64),
        )
        for r in ranks
    ]


# -- the KnOTS space -------------------------------------------------------------------------
def test_knots_projection_is_lossless_and_is_the_joint_svd():
    factors = random_factors(0) + [None]  # an adapter without this module: a zero update
    blocks, back = knots_project(factors, (40, 30))
    assert blocks.shape == (4, sum(RANKS), 30)  # k = rank of [τ_1 … τ_n]
    for f, block in zip(factors, blocks):
        left, right = back(block)  # U · Σ V_iᵀ
        expect = f[0] @ f[1] if f is not None else torch.zeros(40, 30, dtype=torch.float64)
        torch.testing.assert_close(left @ right, expect, rtol=0, atol=1e-12)
    # the blocks are the paper's Σ V_iᵀ, up to the sign of each singular direction
    u, ref_blocks = ref_knots([(L @ R).numpy() for L, R in factors[:3]])
    signs = np.sign(np.sum(back(blocks[0])[0].numpy() * u, axis=0))  # U columns vs numpy's
    for block, ref in zip(blocks, ref_blocks):
        np.testing.assert_allclose(block.numpy() * signs[:, None], ref, atol=1e-10)


def test_knots_task_arithmetic_equals_dense_task_arithmetic(world, tmp_path):
    _, paths, dense, _ = world
    res = merge(
        "task_arithmetic",
        paths,
        tmp_path / "ta",
        weights=WEIGHTS,
        params={"space": "knots"},
        dtype="float64",
    )
    assert res.errors == {}  # exact low rank: nothing re-factorised
    for path, got in adapter_update(tmp_path / "ta").items():
        np.testing.assert_allclose(got, sum(weighted_taus(dense, path)), atol=1e-6)


def test_knots_ties_against_the_paper(world, tmp_path):
    _, _, dense, _ = world
    got = full_update(world, tmp_path / "kt", "ties", {"space": "knots", "density": 0.5})
    for path in SHAPES:
        u, blocks = ref_knots([d[path].numpy() for d in dense])  # weights enter in TIES, not here
        np.testing.assert_allclose(got[path], u @ ref_ties(blocks, WEIGHTS, 0.5), atol=2e-6)


# -- the SVD methods: the papers' rules on full-rank matrices (their setting) ----------------
@pytest.fixture()
def full_rank():
    g = torch.Generator().manual_seed(4)
    deltas = torch.randn(3, 12, 9, generator=g, dtype=torch.float64)  # rank 9 each, and summed
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    return deltas, weights, [w * d for w, d in zip(WEIGHTS, deltas.numpy())]


@pytest.mark.parametrize("fraction, k", [(0.0, 3), (0.2, 1), (1.0, 9)])  # 0: 1/n → ⌊9/3⌋
def test_tsv_is_the_paper_on_full_rank_task_matrices(full_rank, fraction, k):
    deltas, weights, taus = full_rank
    got = tsv(deltas, weights, fraction=fraction, lambda_=1.3)
    np.testing.assert_allclose(got.numpy(), ref_tsv(taus, [k] * 3, alpha=1.3), atol=1e-10)


def test_iso_c_is_the_paper_on_full_rank_task_matrices(full_rank):
    deltas, weights, taus = full_rank
    got = iso_c(deltas, weights, lambda_=1.3)
    np.testing.assert_allclose(got.numpy(), ref_iso_c(taus, 9, alpha=1.3), atol=1e-10)


@pytest.mark.parametrize("f", [0.8, 0.5, 0.0])
def test_iso_cts_is_the_paper_on_full_rank_task_matrices(full_rank, f):
    deltas, weights, taus = full_rank
    got = iso_cts(deltas, weights, common_space_fraction=f, lambda_=1.3)
    np.testing.assert_allclose(got.numpy(), ref_iso_cts(taus, 9, f=f, alpha=1.3), atol=1e-10)


# -- the SVD methods on LoRA adapters, through merge() ---------------------------------------
def test_tsv_on_adapters(world, tmp_path):
    _, _, dense, _ = world
    got = full_update(world, tmp_path / "tsv", "tsv", {})
    ks = [max(1, r // 3) for r in RANKS]  # 1/n of each adapter's own rank, at least one
    for path in SHAPES:
        np.testing.assert_allclose(got[path], ref_tsv(weighted_taus(dense, path), ks), atol=2e-6)


def test_iso_c_and_iso_cts_on_adapters(world, tmp_path):
    _, _, dense, _ = world
    got_c = full_update(world, tmp_path / "isoc", "iso_c", {"lambda": 0.7})
    got_cts = full_update(world, tmp_path / "isocts", "iso_cts", {})
    for path in SHAPES:
        taus = weighted_taus(dense, path)
        rank = np.linalg.matrix_rank(sum(taus))  # the support: Σr, or out when Σr > out
        assert rank == min(sum(RANKS), *SHAPES[path])
        np.testing.assert_allclose(got_c[path], ref_iso_c(taus, rank, alpha=0.7), atol=2e-6)
        np.testing.assert_allclose(got_cts[path], ref_iso_cts(taus, rank), atol=2e-6)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("space", ["core", "knots"])
def test_svd_methods_commute_with_the_lora_spaces(method, space):
    factors = random_factors(1)
    deltas = torch.stack([L @ R for L, R in factors])
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    stacked, back = SPACES[space](factors, (40, 30))
    left, right = back(METHODS[method].fn(stacked, weights))
    torch.testing.assert_close(
        left @ right, METHODS[method].fn(deltas, weights), rtol=0, atol=1e-10
    )


def test_iso_c_in_core_space_equals_dense_and_is_exact_low_rank(world, tmp_path):
    _, paths, _, _ = world
    dense = full_update(world, tmp_path / "dense", "iso_c", {})
    core = full_update(world, tmp_path / "core", "iso_c", {"space": "core"})
    for path in SHAPES:
        np.testing.assert_allclose(core[path], dense[path], atol=1e-6)
    res = merge(
        "iso_c",
        paths,
        tmp_path / "lowrank",
        weights=WEIGHTS,
        params={"space": "core"},
        dtype="float64",
    )
    assert res.errors == {}  # the result lives in the span of the adapters: no truncation
    for path, got in adapter_update(tmp_path / "lowrank").items():
        np.testing.assert_allclose(got, dense[path], atol=2e-6)


# -- properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_weight_zero_removes_an_adapter(fn):
    deltas = torch.stack([L @ R for L, R in random_factors(2)])
    with_zero = fn(deltas, torch.tensor([1.0, 0.0, 0.7], dtype=torch.float64))
    without = fn(deltas[[0, 2]], torch.tensor([1.0, 0.7], dtype=torch.float64))
    torch.testing.assert_close(with_zero, without, rtol=0, atol=1e-12)


def test_tsv_gives_a_single_adapter_back():
    ((L, R),) = random_factors(3, ranks=(5,))
    torch.testing.assert_close(
        tsv((L @ R)[None], torch.ones(1, dtype=torch.float64)), L @ R, rtol=0, atol=1e-12
    )


def test_iso_spectra_are_flat_and_iso_cts_with_all_common_is_iso_c():
    deltas = torch.stack([L @ R for L, R in random_factors(5)])
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    for out in (iso_c(deltas, weights), iso_cts(deltas, weights)):
        s = torch.linalg.svdvals(out)[: sum(RANKS)]
        torch.testing.assert_close(s, s.mean().expand_as(s), rtol=1e-10, atol=0)
        assert torch.linalg.matrix_rank(out) == sum(RANKS)
    torch.testing.assert_close(
        iso_cts(deltas, weights, common_space_fraction=1.0), iso_c(deltas, weights)
    )


def test_registry_entries_and_export_refuses(world):
    _, paths, _, _ = world
    for name in ("tsv", "iso_c", "iso_cts"):
        m = METHODS[name]
        assert m.paper.startswith("https://arxiv.org/abs/") and m.sparse and m.mergekit is None
        assert m.param("space").choices == ("dense", "core", "knots")
        recipe = Recipe.model_validate(
            {"merge_method": name, "models": [{"model": str(p)} for p in paths]}
        )
        with pytest.raises(MergeInputError, match="mergekit has no equivalent"):
            export_mergekit(recipe, base_model="/models/base", root=paths[0].parent)


# -- the command line ------------------------------------------------------------------------
def run(args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def test_cli_iso_c_and_knots_ties(world, tmp_path):
    _, paths, dense, _ = world
    result = run(["iso-c", "--adapters", *paths, "--out", tmp_path / "iso"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "iso" / "adapter_model.safetensors").is_file()
    result = run(
        [
            "ties",
            "--space",
            "knots",
            "--density",
            "0.5",
            "--adapters",
            *paths,
            "--out",
            tmp_path / "kt",
        ]
    )
    assert result.exit_code == 0, result.output
    got = adapter_update(tmp_path / "kt")
    for path in SHAPES:  # unit weights; float32 run
        u, blocks = ref_knots([d[path].numpy() for d in dense])
        np.testing.assert_allclose(got[path], u @ ref_ties(blocks, [1.0] * 3, 0.5), atol=1e-5)
