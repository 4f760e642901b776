"""Our merges against PEFT, on a tiny Qwen2.5-VL: loading, logits, and ``add_weighted_adapter``.

- The merged adapter loaded with ``PeftModel.from_pretrained`` gives the logits of our folded
  full output (exact methods; TIES at full rank).
- PEFT's ``cat`` (exact) and ``ties_svd`` at full rank with weights [1, 1] (dense TIES, then an
  SVD) are independent oracles that must agree with us.
- PEFT's factor-wise ``linear`` and ``ties`` combine A and B separately. The test pins what that
  computes (``linear`` = our result + the cross terms B_i A_j) and that it is not our merge:
  the reason we never merge factors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emomerge.merging import merge

from . import tiny_models as T

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 300, 3, 250, 11]])
LOGIT_TOL = 1e-4  # float32 forward of two differently-rounded weight sets
WEIGHT_TOL = 1e-6
SVD_TOL = 5e-6  # ties_svd reconstructs ΔW from a float32 SVD (measured max 1.5e-6)
FLIP_BUDGET = 1e-3
S = 8 / 4  # lora_alpha / r of tiny_models.make_lora


@pytest.fixture(scope="session")
def qwen(tmp_path_factory) -> T.Tiny:
    return T.tiny_family(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def base_logits(qwen) -> torch.Tensor:
    return T.logits(T.load_model("qwen2_5_vl", qwen.base), IDS)


def lm_updates(qwen: T.Tiny, folder: Path) -> dict[str, torch.Tensor]:
    """{adapter module path: full-output weight − base weight (float64)}, the 14 LoRA modules."""
    full, base = T.load_state(folder), T.load_state(qwen.base)
    return {
        p: full[qwen.base_key(p)].double() - base[qwen.base_key(p)].double()
        for p in T.dense_updates(qwen.adapters[0])
    }


# -- the merged adapter in PEFT == the folded full model -------------------------------------
W = [0.5, 0.3, 0.8]
CASES = {  # coeffs: c_i with merged = Σ c_i τ_i (the linear methods)
    "linear": {"params": {}, "rank": None, "coeffs": [w / sum(W) for w in W]},
    "task_arithmetic": {"params": {"lambda": 0.7}, "rank": None, "coeffs": [0.7 * w for w in W]},
    # TIES is dense: at full rank (64 ≥ every module's smaller side) the refactorisation is exact.
    "ties": {"params": {"density": 0.5}, "rank": 64, "coeffs": None},
}


@pytest.mark.parametrize("method", list(CASES))
def test_adapter_in_peft_gives_full_output_logits(method, qwen, base_logits, tmp_path):
    from peft import PeftModel

    case = CASES[method]
    common = {"weights": W, "params": case["params"], "base": qwen.base}
    merge(
        method, qwen.adapters, tmp_path / "adapter", output="adapter", rank=case["rank"], **common
    )
    merge(method, qwen.adapters, tmp_path / "full", output="full", **common)

    if case["coeffs"] is not None:  # linear methods: full output = base + Σ c_i τ_i exactly
        dense = [T.dense_updates(a) for a in qwen.adapters]
        for path, update in lm_updates(qwen, tmp_path / "full").items():
            expected = sum(c * d[path] for c, d in zip(case["coeffs"], dense))
            assert float((update - expected).abs().max()) < WEIGHT_TOL, path

    model = PeftModel.from_pretrained(T.load_model("qwen2_5_vl", qwen.base), tmp_path / "adapter")
    model.eval()
    wrapped = [
        n for n, m in model.named_modules() if hasattr(m, "lora_A") and "language_model" in n
    ]
    assert len(wrapped) == 14
    got = T.logits(model, IDS)
    want = T.logits(T.load_model("qwen2_5_vl", tmp_path / "full"), IDS)
    assert float((want - base_logits).abs().max()) > 1e-2  # the merge changes the model
    assert float((got - want).abs().max()) < LOGIT_TOL


# -- add_weighted_adapter: two adapters -------------------------------------------------------
@pytest.fixture(scope="module")
def weighted(qwen):
    """PEFT model with adapters a0, a1 and their add_weighted_adapter combinations.

    Returns {combination: {module path: ΔW (float64)}} and the adapters' own (A, B) per module.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        T.load_model("qwen2_5_vl", qwen.base), qwen.adapters[0], adapter_name="a0"
    )
    model.load_adapter(qwen.adapters[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "linear", combination_type="linear")
    model.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "cat", combination_type="cat")
    model.add_weighted_adapter(
        ["a0", "a1"], [1.0, 1.0], "ties", combination_type="ties", density=0.5
    )
    model.add_weighted_adapter(
        ["a0", "a1"],
        [1.0, 1.0],
        "ties_svd",
        combination_type="ties_svd",
        density=0.5,
        svd_rank=64,
        svd_full_matrices=False,
    )
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    factors: dict[str, dict[str, tuple]] = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "a0" in module.lora_A:
            path = name[len(prefix) :]
            for combo in ("linear", "cat", "ties", "ties_svd"):
                delta = module.get_delta_weight(combo).detach().double()
                deltas.setdefault(combo, {})[path] = delta
            factors[path] = tuple(
                (
                    module.lora_A[a].weight.detach().double(),
                    module.lora_B[a].weight.detach().double(),
                )
                for a in ("a0", "a1")
            )
    assert len(factors) == 14
    return deltas, factors


def test_peft_cat_equals_our_task_arithmetic(qwen, weighted, tmp_path):
    """``cat`` stacks the factors: exact, and the same as ours."""
    deltas, _ = weighted
    merge(
        "task_arithmetic",
        qwen.adapters[:2],
        tmp_path / "ta",
        weights=[0.6, 0.4],
        output="full",
        base=qwen.base,
    )
    for path, update in lm_updates(qwen, tmp_path / "ta").items():
        assert float((update - deltas["cat"][path]).abs().max()) < WEIGHT_TOL, path


def test_peft_factorwise_linear_is_ours_plus_cross_terms(qwen, weighted, tmp_path):
    """PEFT ``linear``: (Σ √(w_i s) B_i)(Σ √(w_j s) A_j) = Σ w_i s B_i A_i + cross terms B_i A_j.

    Ours is Σ w_i ΔW_i. The difference is exactly the cross terms, and it is not small.
    """
    deltas, factors = weighted
    w0, w1 = 0.6, 0.4
    merge(
        "task_arithmetic",
        qwen.adapters[:2],
        tmp_path / "ta",
        weights=[w0, w1],
        output="full",
        base=qwen.base,
    )
    ours = lm_updates(qwen, tmp_path / "ta")
    rel = []
    for path, ((a0, b0), (a1, b1)) in factors.items():
        cross = (w0 * S * w1 * S) ** 0.5 * (b0 @ a1 + b1 @ a0)
        peft = deltas["linear"][path]
        assert float((peft - (ours[path] + cross)).abs().max()) < 1e-5, path
        rel.append(float((peft - ours[path]).norm() / ours[path].norm()))
    assert min(rel) > 0.3, rel  # cross terms are as large as the update itself here


def ties_full(qwen, tmp_path) -> dict[str, torch.Tensor]:
    merge(
        "ties",
        qwen.adapters[:2],
        tmp_path / "ties",
        weights=[1.0, 1.0],
        params={"density": 0.5},
        output="full",
        base=qwen.base,
    )
    return lm_updates(qwen, tmp_path / "ties")


def test_peft_ties_svd_full_rank_matches_our_ties(qwen, weighted, tmp_path):
    """``ties_svd`` trims the dense ΔW_i, then SVDs: at full rank, weights [1, 1] (where PEFT's
    count divisor equals mergekit's weight-sum divisor) it is dense TIES, like ours."""
    deltas, _ = weighted
    ours = ties_full(qwen, tmp_path)
    worst, flips, total = 0.0, 0, 0
    for path, update in ours.items():
        d = (update - deltas["ties_svd"][path]).abs()
        worst, flips = max(worst, float(d.max())), flips + int((d > SVD_TOL).sum())
        total += d.numel()
        # trimming really happened: about half the entries of each task vector are zero
        assert float((update == 0).double().mean()) > 0.05, path
    print(f"\nPEFT ties_svd (full rank) vs ours: max |d| {worst:.3g}, flips {flips}/{total}")
    assert flips <= FLIP_BUDGET * total, (worst, flips, total)


def test_peft_factorwise_ties_is_not_our_ties(qwen, weighted, tmp_path):
    """PEFT ``ties`` trims A and B separately: its product has no entry-wise meaning, and the
    result is far from dense TIES (docs/DESIGN.md, Facts: differences up to 0.08 on the same inputs)."""
    deltas, _ = weighted
    ours = ties_full(qwen, tmp_path)
    rel = [float((deltas["ties"][p] - u).norm() / u.norm()) for p, u in ours.items()]
    worst = max(float((deltas["ties"][p] - u).abs().max()) for p, u in ours.items())
    print(
        f"\nPEFT factor-wise ties vs ours: max |d| {worst:.3g}, "
        f"relative {min(rel):.2f}..{max(rel):.2f}"
    )
    assert min(rel) > 0.2, rel
    assert worst > 0.05
