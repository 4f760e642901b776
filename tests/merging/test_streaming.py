"""The streamed merge (``merging.streaming``) against the dense path it replaces.

Reference: ``engine.apply_method(method, stacked τ, params)`` on the dense task vectors, which the
mergekit oracle tests pin to mergekit. Trimming and random masks must be identical (same entries
kept); values equal to float rounding (the L1 rescale sums are accumulated block by block).
Shapes are chosen so row blocks do not divide the row count, and ``exact_below=0`` forces the
sampled-bracket selection that large tensors use.
"""

from __future__ import annotations

import pytest
import torch

from emomerge.merging import sparsify as sp
from emomerge.merging import streaming as S
from emomerge.merging.engine import apply_method, derive_seed, get_method, resolve_params
from emomerge.merging.lowrank import refactor

SHAPE = (203, 77)
RANKS = (3, 8, 5, 16)


def random_factors(seed, ranks=RANKS, shape=SHAPE, dtype=torch.float32, missing=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        L = torch.randn(shape[0], r, generator=g, dtype=dtype)
        R = torch.randn(r, shape[1], generator=g, dtype=dtype) / 5
        out.append(None if i in missing else (L, R))
    return out


def reference(name, factors, params, shape=SHAPE, seed=7, module="m"):
    method = get_method(name)
    resolved = resolve_params(method, len(factors), params)
    dtype = next(f[0].dtype for f in factors if f is not None)
    stacked = torch.stack(
        [torch.zeros(shape, dtype=dtype) if f is None else f[0] @ f[1] for f in factors]
    )  # [n_adapters, out, in], as TaskVectors.stacked builds it
    return resolved, apply_method(method, stacked, resolved, seed=seed, module=module)


def generators(n, seed=7, module="m"):
    return [torch.Generator().manual_seed(derive_seed(seed, module, i)) for i in range(n)]


def assert_same_merge(got, ref, *, exact):
    """``exact``: the same entries kept (exact thresholds, same masks) and the kept values equal
    up to the rounding of the products themselves. BLAS may sum a row block of ``L @ R`` in an
    order that depends on the block's height, so a block-wise product can differ from the whole
    product by an ulp (seen with MKL on AMD EPYC: 2.4e-7 on values near 1 for 50-row blocks,
    none for 16-row blocks); the kept set is what trimming decides and must match exactly."""
    assert torch.equal(got != 0, ref != 0), "a different set of entries survived"
    if exact:
        ulp = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=0, atol=4 * ulp)
    else:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6 * float(ref.abs().max()))


CASES = [
    ("ties", dict(density=0.4), True),
    (
        "ties",
        dict(density=[0.3, 0.5, 0.9, 0.2], weight=[1.0, 0.5, 2.0, -1.0], **{"lambda": 0.7}),
        True,
    ),
    ("ties", dict(density=0.5, normalize=False), True),
    ("ties", dict(density=0.5, rescale=True), False),
    ("dare_ties", dict(density=0.5, weight=[1.0, 0.3, 1.2, 0.8]), False),
    ("dare_ties", dict(density=0.6, rescale=False), True),
    ("dare_linear", dict(density=0.5, rescale="density"), True),
    ("breadcrumbs", dict(density=0.5, gamma=0.1), True),
    ("breadcrumbs", dict(density=0.5, gamma=0.0), True),
    ("breadcrumbs_ties", dict(density=[0.4, 0.5, 0.6, 0.7], gamma=0.05), True),
    ("task_arithmetic", dict(weight=[1.0, 0.5, 2.0, -1.0], **{"lambda": 1.3}), True),
    ("linear", dict(weight=[1.0, 0.5, 2.0, 3.0]), True),
    ("della", dict(density=0.5, epsilon=0.1), False),
    ("della_linear", dict(density=0.5, epsilon=0.2), False),
]


@pytest.mark.parametrize(
    "name,params,exact", CASES, ids=lambda v: v if isinstance(v, str) else None
)
@pytest.mark.parametrize(
    "block_rows,exact_below,workers",
    [
        (16, 0, 1),  # 203 = 12·16 + 11; sampled bracket
        (101, 0, 2),  # 203 = 2·101 + 1: the 1-row tail is folded in; two workers
        (50, 10**9, 2),  # dense selection path
    ],
)
def test_streamed_equals_dense(name, params, exact, block_rows, exact_below, workers):
    factors = random_factors(1, missing=(2,) if name == "ties" and block_rows == 16 else ())
    resolved, ref = reference(name, factors, params)
    got = S.merge_dense(
        name,
        factors,
        SHAPE,
        resolved,
        generators=generators(len(factors)),
        workers=workers,
        block_rows=block_rows,
        exact_below=exact_below,
    )
    assert_same_merge(got, ref, exact=exact)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare_ties"])
def test_float64(name):
    factors = random_factors(2, dtype=torch.float64)
    params = dict(density=0.5) | (dict(gamma=0.1) if name == "breadcrumbs" else {})
    resolved, ref = reference(name, factors, params)
    got = S.merge_dense(
        name, factors, SHAPE, resolved, generators=generators(4), block_rows=16, exact_below=0
    )
    assert_same_merge(got, ref, exact=name != "dare_ties")


def test_ties_at_the_threshold_follow_top_mask():
    # small integers: thousands of entries equal the threshold; kept by lower flat index
    g = torch.Generator().manual_seed(3)
    factors = [
        (
            torch.randint(-2, 3, (203, 2), generator=g).float(),
            torch.randint(-2, 3, (2, 77), generator=g).float(),
        )
        for _ in range(3)
    ]
    for name, params in (
        ("ties", dict(density=0.37)),
        ("breadcrumbs", dict(density=0.4, gamma=0.13)),
    ):
        resolved, ref = reference(name, factors, params)
        got = S.merge_dense(name, factors, SHAPE, resolved, block_rows=16, exact_below=0)
        assert_same_merge(got, ref, exact=True)
    single = S._Stream(  # the one-pass TIES resolves these ties too (no fallback)
        "ties",
        factors,
        SHAPE,
        reference("ties", factors, dict(density=0.37))[0],
        None,
        workers=1,
        block_rows=16,
        exact_below=0,
    )
    assert single.resolve([single.mix_rows(single.blocks, lambda *a: None)]) is not None
    tau = factors[0][0] @ factors[0][1]
    desc = S._stats_magnitude(
        *factors[0], [int(0.37 * tau.numel())], False, S.row_blocks(203, 16), 0
    )[0]
    assert desc.ties.numel() > 0  # the case really has kept ties


@pytest.mark.parametrize(
    "ranks,missing,params",
    [
        ((3, 8, 5, 16), (), dict(density=0.4)),  # 4 unit weights: the fused kernel
        ((3, 8, 5), (), dict(density=0.45, normalize=False)),  # 3: fused, padded
        ((3, 8, 5, 16), (1,), dict(density=0.4)),  # an absent adapter
        ((3, 8, 5, 16, 2), (), dict(density=0.4)),  # 5 adapters: the general kernel
        ((3, 8, 5, 16), (), dict(density=0.4, weight=[1.0, 0.5, 2.0, 1.5])),  # weighted: general
    ],
)
def test_plain_ties_resolves_in_one_pass(monkeypatch, ranks, missing, params):
    # the single pass's counts and candidates must give the exact thresholds by themselves: a
    # wrong tally would fall back to the two passes and still be right, so forbid the fallback
    def no_fallback(self):
        raise AssertionError("the single pass fell back to two passes")

    monkeypatch.setattr(S._Stream, "two_pass", no_fallback)
    factors = random_factors(11, ranks=ranks, missing=missing)
    resolved, ref = reference("ties", factors, params)
    for block_rows, workers in ((16, 1), (101, 2)):
        got = S.merge_dense(
            "ties", factors, SHAPE, resolved, block_rows=block_rows, exact_below=0, workers=workers
        )
        assert_same_merge(got, ref, exact=True)


def test_a_missed_bracket_falls_back_to_exact_selection(monkeypatch):
    monkeypatch.setattr(S.selection, "_bracket", lambda sample, n, k, z=4.0: (1e30, 1e30))
    factors = random_factors(4)
    resolved, ref = reference("ties", factors, dict(density=0.3))
    got = S.merge_dense("ties", factors, SHAPE, resolved, block_rows=16, exact_below=0)
    assert_same_merge(got, ref, exact=True)


@pytest.mark.parametrize("side", ["below", "above"])
def test_a_first_bracket_that_misses_is_retried_wider(monkeypatch, side):
    real = S.selection._bracket
    calls = []

    def narrow_then_real(sample, n, k, z=4.0):
        calls.append(z)
        lo, hi = real(sample, n, k, z)
        if z == S._Z[0]:  # a bracket entirely on one side of the threshold
            return (hi * 1.5, hi * 2.0) if side == "above" else (lo / 4, lo / 2)
        return lo, hi

    monkeypatch.setattr(S.selection, "_bracket", narrow_then_real)
    monkeypatch.setattr(
        S.selection, "_descriptor_dense", None
    )  # the dense fallback must not be needed
    factors = random_factors(6)
    resolved, ref = reference("ties", factors, dict(density=0.3))
    got = S.merge_dense("ties", factors, SHAPE, resolved, block_rows=16, exact_below=0)
    assert_same_merge(got, ref, exact=True)
    assert S._Z[1] in calls


def test_candidate_buffers_grow_when_the_estimate_is_short(monkeypatch):
    real = S.selection._count_pass
    monkeypatch.setattr(
        S.selection,
        "_count_pass",
        lambda L, R, blocks, brackets, sums, expect: real(
            L, R, blocks, brackets, sums, [1] * len(expect)
        ),
    )
    factors = random_factors(7)
    for name, params in (
        ("ties", dict(density=0.45)),
        ("ties", dict(density=0.45, rescale=True)),
        ("breadcrumbs", dict(density=0.5, gamma=0.1)),
    ):
        resolved, ref = reference(name, factors, params)
        got = S.merge_dense(name, factors, SHAPE, resolved, block_rows=16, exact_below=0)
        assert_same_merge(got, ref, exact="rescale" not in params)


def test_same_seed_same_bytes():
    factors = random_factors(5)
    resolved = resolve_params(get_method("dare_ties"), 4, dict(density=0.5))
    runs = [
        S.merge_dense(
            "dare_ties", factors, SHAPE, resolved, generators=generators(4, seed=s), block_rows=16
        )
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_row_blocks_cover_the_rows_without_one_row_products():
    for rows in (1, 2, 3, 17, 33, 203, 1000):
        for block in (1, 2, 16, 32, 101, 5000):
            blocks = S.row_blocks(rows, block)
            assert blocks[0][0] == 0 and blocks[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert rows == 1 or all(e - s >= 2 for s, e in blocks)


@pytest.mark.parametrize(
    "name,params",
    [
        ("ties", dict(density=0.5)),
        ("dare_ties", dict(density=0.5)),
        ("breadcrumbs", dict(density=0.6, gamma=0.05)),
    ],
)
@pytest.mark.parametrize("exact_below", [10**9, 0])  # 0: ties runs the single pass
def test_factors_error_is_exact_and_close_to_refactor(name, params, exact_below):
    shape, ranks, k = (400, 260), (4, 8, 6, 10), 8
    factors = random_factors(6, ranks=ranks, shape=shape)
    resolved, dense = reference(name, factors, params, shape=shape)
    left, right, err = S.merge_factors(
        name,
        factors,
        shape,
        resolved,
        k,
        generators=generators(4),
        block_rows=64,
        exact_below=exact_below,
    )
    assert left.shape == (shape[0], k) and right.shape == (k, shape[1])
    actual = float(torch.linalg.matrix_norm(dense - left @ right) / torch.linalg.matrix_norm(dense))
    assert err == pytest.approx(actual, rel=1e-4)  # the projection identity, not an estimate
    _, _, ref_err = refactor(dense, k, generator=torch.Generator().manual_seed(0))
    best = torch.linalg.svdvals(dense.double())
    optimal = float((best[k:].square().sum() / best.square().sum()).sqrt())
    assert ref_err >= optimal - 1e-6 and err >= optimal - 1e-6
    assert err <= optimal * 1.02 + 1e-4, (err, ref_err, optimal)  # within 2% of Eckart–Young


def test_factors_fall_back_when_the_basis_is_small():
    shape = (60, 40)
    factors = random_factors(7, ranks=(2, 3), shape=shape)
    resolved, dense = reference("ties", factors, dict(density=0.5), shape=shape)
    g = torch.Generator().manual_seed(0)
    left, right, err = S.merge_factors("ties", factors, shape, resolved, 4, refactor_generator=g)
    expect = refactor(dense, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(left @ right, expect[0] @ expect[1])
    assert err == pytest.approx(expect[2], rel=1e-5)


def test_supports():
    assert S.supports("ties", {"space": "dense", "paper": False})
    assert not S.supports("ties", {"space": "dense", "paper": True})
    assert not S.supports("ties", {"space": "core"})
    assert not S.supports("svd_merge", {"space": "dense"})


def test_bernoulli_draws_match_torch_bernoulli():
    # sparsify.bernoulli draws with torch.rand < p: the same stream as torch.bernoulli(full(p))
    t = torch.randn(97, 31)
    a = torch.bernoulli(torch.full_like(t, 0.3), generator=torch.Generator().manual_seed(9))
    b = sp.bernoulli(t, 0.3, generator=torch.Generator().manual_seed(9), rescale=False)
    assert torch.equal(t * a, b)


@pytest.mark.parametrize(
    "name,params",
    [
        ("ties", dict(density=0.35, weight=[1.0, 0.3, -0.5] * 3)),
        ("breadcrumbs_ties", dict(density=0.5, gamma=0.05)),
    ],
)
def test_many_adapters_sum_in_the_dense_order(name, params):
    # the fused kernels add adapters one by one, in order; torch.sum over a [9, 203, 77] stack
    # vectorises in another order, so values agree to rounding (the kept entries exactly)
    factors = random_factors(8, ranks=(3, 8, 5, 16, 2, 7, 4, 1, 6))
    resolved, ref = reference(name, factors, params)
    got = S.merge_dense(name, factors, SHAPE, resolved, block_rows=16, exact_below=0)
    assert_same_merge(got, ref, exact=False)


def test_plain_ties_takes_the_single_pass(monkeypatch):
    # one pass, the uncertain positions re-mixed afterwards: equal to the dense merge, and
    # equal (to rounding) to the two passes in the adapter output's projection
    def no_second_pass(self):
        raise AssertionError("the single pass fell back to two passes")

    resolves = []
    real_resolve, real_single = S._Stream.resolve, S._Stream._single_pass_brackets
    monkeypatch.setattr(
        S._Stream, "resolve", lambda self, t: resolves.append(1) or real_resolve(self, t)
    )
    factors = random_factors(9, missing=(1,))
    for params in (
        dict(density=0.4),
        dict(density=[0.2, 0.6, 1.0, 0.5], weight=[1.0, 2.0, 0.5, -1.0]),
    ):
        resolved, ref = reference("ties", factors, params)
        with monkeypatch.context() as mp:
            mp.setattr(S._Stream, "two_pass", no_second_pass)
            got = S.merge_dense(
                "ties", factors, SHAPE, resolved, block_rows=16, exact_below=0, workers=2
            )
            single = S.merge_factors(
                "ties", factors, SHAPE, resolved, 6, block_rows=16, exact_below=0
            )
        assert_same_merge(got, ref, exact=True)
        assert len(resolves) == 2
        monkeypatch.setattr(S._Stream, "_single_pass_brackets", lambda self: None)
        double = S.merge_factors("ties", factors, SHAPE, resolved, 6, block_rows=16, exact_below=0)
        monkeypatch.setattr(S._Stream, "_single_pass_brackets", real_single)
        resolves.clear()
        torch.testing.assert_close(
            single[0] @ single[1], double[0] @ double[1], rtol=1e-5, atol=1e-5
        )
        assert single[2] == pytest.approx(double[2], rel=1e-5)


@pytest.mark.parametrize("weight", [[1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 2.0, 1.5]])  # fused, general
def test_single_pass_buffers_grow_when_short(monkeypatch, weight):
    real = S._Stream._tally_state
    sizes = []

    def tiny(self, n_rows):
        st = real(self, n_rows)
        st["uidx"], st["uraw"] = st["uidx"][:1].copy(), st["uraw"][:, :1].copy()
        sizes.append(st)
        return st

    monkeypatch.setattr(S._Stream, "_tally_state", tiny)
    monkeypatch.setattr(S._Stream, "two_pass", None)  # grown, not fallen back
    factors = random_factors(10)
    resolved, ref = reference("ties", factors, dict(density=0.45, weight=weight))
    got = S.merge_dense("ties", factors, SHAPE, resolved, block_rows=16, exact_below=0, workers=2)
    assert all(st["uidx"].size > 1 for st in sizes)
    assert_same_merge(got, ref, exact=True)
