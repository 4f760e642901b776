"""Holm's step-down adjustment: a hand-computed example, the step-down rejection rule it must
reproduce at every level, and the leaderboard families of :func:`add_holm`."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emomerge.evaluation.bootstrap import add_holm, holm


def test_holm_by_hand():
    # 4 non-NaN p-values (the NaN is no test and does not count):
    #   sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04
    #   running max -> 0.02, 0.03, 0.06, 0.06
    got = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(got[3]) and got[4] == pytest.approx(0.02)
    # capped at 1 and monotone: 0.6*2 = 1.2 -> 1, then max(1, 0.7) = 1
    assert holm([0.7, 0.6]) == [1.0, 1.0]
    # family of one: unchanged
    assert holm([0.0123]) == [0.0123]
    assert holm([]) == []
    # m = 5: x5, x4, x3, x2, x1 = 0.05, 0.08, 0.09, 0.08, 0.05 -> running max
    assert holm([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])


def _step_down_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's procedure as published: walk the sorted p-values, reject H_(k) while
    p_(k) <= alpha / (m - k) (0-based k), stop at the first that is not."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    m, out = len(p), set()
    for k, i in enumerate(order):
        if p[i] > alpha / (m - k):
            break
        out.add(i)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.sampled_from([0.01, 0.05, 0.1, 0.2]))
def test_adjusted_p_rejects_exactly_what_the_step_down_procedure_rejects(p, alpha):
    adj = holm(p)
    assert all(a >= x for a, x in zip(adj, p)) and all(a <= 1 for a in adj)
    got = {i for i, a in enumerate(adj) if a <= alpha}
    # floating-point ties at the boundary (p == alpha / k) are the only possible disagreement
    edge = {
        i for i, x in enumerate(p) if any(abs(x * k - alpha) < 1e-12 for k in range(1, len(p) + 1))
    }
    assert got - edge == _step_down_rejects(p, alpha) - edge


def _row(
    variant: str, p: float | None, *, kind: str = "merged", seed: int = 0, config: str = "c1"
) -> dict:
    row = {
        "architecture": "qwen2_5_vl",
        "dataset": "emoart",
        "split": "test",
        "seed": seed,
        "baseline": "s2",
        "config_hash": config,
        "variant": variant,
        "kind": kind,
        "macro_f1": 0.5,
    }
    if p is not None:
        row["macro_f1_p"] = p
    return row


def test_add_holm_families_skip_trivial_and_untested_rows():
    rows = [
        _row("s2", None, kind="stage"),  # the baseline: no p
        _row("m1", 0.01),
        _row("m2", 0.04),
        _row("m3", 0.03),
        _row("trivial-majority", 0.001, kind="trivial"),
        _row("m4", float("nan")),  # no test made
        _row("m1", 0.02, seed=1),
        _row("m2", 0.5, seed=1),  # another family (seed)
        _row("m1", 0.02, config="c2"),
    ]  # another family (config)
    rows[1]["accuracy_p"] = 0.2  # second metric, own family
    rows[2]["accuracy_p"] = 0.01
    add_holm(rows)
    # family seed 0 / c1, macro_f1 (m1 m2 m3; trivial and NaN rows out, so m = 3):
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert [rows[i]["macro_f1_p_holm"] for i in (1, 2, 3)] == pytest.approx([0.03, 0.06, 0.06])
    # accuracy family: 0.01, 0.2 -> 0.02, 0.2
    assert rows[1]["accuracy_p_holm"] == pytest.approx(0.2)
    assert rows[2]["accuracy_p_holm"] == pytest.approx(0.02)
    assert "accuracy_p_holm" not in rows[3]
    # trivial rows keep their raw p and get no adjusted one; untested rows get none
    assert rows[4]["macro_f1_p"] == 0.001 and "macro_f1_p_holm" not in rows[4]
    assert "macro_f1_p_holm" not in rows[0] and "macro_f1_p_holm" not in rows[5]
    # seed 1: 0.02, 0.5 -> 0.04, 0.5; config c2 alone: unchanged
    assert rows[6]["macro_f1_p_holm"] == pytest.approx(0.04)
    assert rows[7]["macro_f1_p_holm"] == pytest.approx(0.5)
    assert rows[8]["macro_f1_p_holm"] == pytest.approx(0.02)


def test_add_holm_reads_leaderboard_cells():
    rows = [_row("m1", None), _row("m2", None)]
    rows[0]["macro_f1_p"], rows[1]["macro_f1_p"] = "0.01", ""
    add_holm(rows)
    assert rows[0]["macro_f1_p_holm"] == pytest.approx(0.01)
    assert "macro_f1_p_holm" not in rows[1]
