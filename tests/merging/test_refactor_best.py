"""``--refactor best``: a fixed-rank sparse merge keeps the closer of the joint-basis projection
and a truncated SVD of the exact merged block — checked against oracles written here.

Oracle: the merged update D is TIES written plainly (``test_methods_reference``'s numpy trimming
and sign election) on the dense task vectors τ_i = L_i R_i, in float64. From ``torch.linalg.svd``
of D: the Eckart–Young optimum ‖D − D_k‖/‖D‖ = √(Σ_{j>k} s_j² / Σ s_j²); from the SVD of the
stacked L factors: the joint basis Q, and the projection's error ‖D − (QQᵀD)_k‖/‖D‖. Every error
the code reports is re-measured here on the factors it returned (or wrote).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging import lowrank, merge
from emomerge.merging import streaming as S
from emomerge.merging.engine import get_method, resolve_params
from emomerge.merging.errors import MergeInputError

from .helpers import PREFIX, lm_modules, write_adapter
from .test_methods_reference import ref_ties_mix, ref_trim

DENSITY = 0.5


def random_factors(seed: int, ranks, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(shape[0], r, generator=g, dtype=dtype),
            torch.randn(r, shape[1], generator=g, dtype=dtype) / 5,
        )
        for r in ranks
    ]


def oracle_ties(factors, density=DENSITY) -> torch.Tensor:
    """Plain TIES (weights 1, normalised, λ 1) of τ_i = L_i R_i, float64."""
    taus = [(L.double() @ R.double()).numpy() for L, R in factors]
    trimmed = [ref_trim(t, density) for t in taus]
    return torch.from_numpy(ref_ties_mix(trimmed, [1.0] * len(taus), True, 1.0))


def rel(approx: torch.Tensor, d: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(d - approx.double()) / torch.linalg.matrix_norm(d))


def optimum(d: torch.Tensor, k: int) -> float:
    s2 = torch.linalg.svd(d).S.square()
    return math.sqrt(float(s2[k:].sum() / s2.sum()))


def projection_error(d: torch.Tensor, factors, k: int) -> float:
    """‖D − (QQᵀD)_k‖/‖D‖: the best rank k within the adapters' joint column space."""
    u, s, _ = torch.linalg.svd(
        torch.cat([L.double() for L, _ in factors], dim=1), full_matrices=False
    )
    q = u[:, s > s[0] * 1e-10]
    pu, ps, pvh = torch.linalg.svd(q @ (q.T @ d), full_matrices=False)
    return rel((pu[:, :k] * ps[:k]) @ pvh[:k], d)


def run_factors(factors, shape, k, refactor=None, **kw):
    resolved = resolve_params(get_method("ties"), len(factors), {"density": DENSITY})
    info: dict = {}
    extra = {} if refactor is None else {"refactor": refactor}
    left, right, err = S.merge_factors(
        "ties",
        factors,
        shape,
        resolved,
        k,
        info=info,
        refactor_generator=torch.Generator().manual_seed(0),
        **extra,
        **kw,
    )
    return left, right, err, info


# (48, 40), k 10: the joint basis (19 columns) is used by the projection, and k + 10 ≥ 40 // 2
# makes lowrank.refactor take the exact SVD
SMALL, SMALL_RANKS, SMALL_K = (48, 40), (6, 6, 7), 10


def test_small_best_is_the_eckart_young_optimum():
    factors = random_factors(1, SMALL_RANKS, SMALL)
    d = oracle_ties(factors)
    left, right, err, info = run_factors(factors, SMALL, SMALL_K, refactor="best")
    opt, proj = optimum(d, SMALL_K), projection_error(d, factors, SMALL_K)
    assert info["refactor"] == "svd"
    assert err == pytest.approx(opt, abs=1e-6)
    assert rel(left @ right, d) == pytest.approx(
        err, abs=1e-6
    )  # the reported error is the true one
    assert err <= proj + 1e-9 and proj > opt + 1e-3  # the projection is not optimal here
    assert info["projection_error"] == pytest.approx(proj, abs=1e-6)
    assert left.shape == (SMALL[0], SMALL_K) and right.shape == (SMALL_K, SMALL[1])


def test_default_is_todays_projection():
    factors = random_factors(1, SMALL_RANKS, SMALL)
    d = oracle_ties(factors)
    today = run_factors(factors, SMALL, SMALL_K)  # no refactor argument: the code before it
    left, right, err, info = run_factors(factors, SMALL, SMALL_K, refactor="projection")
    assert (
        info["refactor"] == today[3]["refactor"] == "projection" and "projection_error" not in info
    )
    assert torch.equal(left, today[0]) and torch.equal(right, today[1]) and err == today[2]
    assert err == pytest.approx(projection_error(d, factors, SMALL_K), abs=1e-6)
    assert rel(left @ right, d) == pytest.approx(err, abs=1e-6)


def test_best_projection_candidate_matches_the_streamed_one():
    """The projection computed from the dense D (best) is the streamed projection (default)."""
    factors = random_factors(1, SMALL_RANKS, SMALL)
    _, _, streamed, _ = run_factors(factors, SMALL, SMALL_K)
    _, _, _, info = run_factors(factors, SMALL, SMALL_K, refactor="best")
    assert info["projection_error"] == pytest.approx(streamed, abs=1e-9)


# (400, 360), k 8: k + 10 < 180, so the SVD candidate is randomized
LARGE, LARGE_RANKS, LARGE_K = (400, 360), (8, 8, 8, 8), 8


@pytest.fixture(scope="module")
def large():
    factors = random_factors(3, LARGE_RANKS, LARGE, dtype=torch.float32)
    d = oracle_ties(factors)
    return factors, d, optimum(d, LARGE_K), projection_error(d, factors, LARGE_K)


def test_large_randomized_candidate_wins_when_better(large):
    factors, d, opt, proj = large
    left, right, err, info = run_factors(factors, LARGE, LARGE_K, refactor="best")
    assert info["refactor"] == "randomized svd"
    assert err < proj - 1e-3  # started from the projection's subspace: it improves on it
    assert opt - 1e-6 <= err <= opt + 1e-4  # and is (close to) the optimum
    assert rel(left @ right, d) == pytest.approx(
        err, abs=1e-5
    )  # the error is the true one (float32)
    assert info["projection_error"] == pytest.approx(proj, abs=1e-5)


def test_large_randomized_candidate_is_dropped_when_worse(large, monkeypatch):
    """A worse SVD candidate (here: a plain sketch, no start, no power iteration) loses to the
    projection, which is then what is returned and reported."""
    factors, d, _, proj = large
    real = lowrank.refactor

    def weak(dense, rank, **kw):
        kw.update(start=None, n_iter=0, oversample=0)
        return real(dense, rank, **kw)

    monkeypatch.setattr(lowrank, "refactor", weak)
    left, right, err, info = run_factors(factors, LARGE, LARGE_K, refactor="best")
    weak_err = weak(d.float(), LARGE_K, generator=torch.Generator().manual_seed(0))[2]
    assert weak_err > proj  # the candidate really was worse
    assert info["refactor"] == "projection" and info["basis"] == sum(LARGE_RANKS)
    assert err == pytest.approx(proj, abs=1e-5) == info["projection_error"]
    assert rel(left @ right, d) == pytest.approx(err, abs=1e-5)


def test_forced_randomized_branch_on_a_small_matrix(monkeypatch):
    """With the exact-SVD threshold out of reach (oversample 0 → k < min/2), the small case runs
    the randomized branch: still never worse than the projection, the error still the true one."""
    real = lowrank.refactor
    monkeypatch.setattr(
        lowrank, "refactor", lambda dense, rank, **kw: real(dense, rank, **{**kw, "oversample": 0})
    )
    factors = random_factors(1, SMALL_RANKS, SMALL)
    d = oracle_ties(factors)
    left, right, err, info = run_factors(factors, SMALL, 6, refactor="best")
    proj = projection_error(d, factors, 6)
    assert info["refactor"] in ("randomized svd", "projection")
    assert err <= proj + 1e-9 and err >= optimum(d, 6) - 1e-9
    assert rel(left @ right, d) == pytest.approx(err, abs=1e-9)


def test_basis_smaller_than_the_rank_uses_the_svd_alone():
    shape, k = (48, 40), 10
    factors = random_factors(4, (2, 3), shape)
    d = oracle_ties(factors)
    left, right, err, info = run_factors(factors, shape, k, refactor="best")
    assert info["refactor"] == "svd" and info["projection_error"] is None
    assert err == pytest.approx(optimum(d, k), abs=1e-6) == rel(left @ right, d)


def test_zero_update():
    shape = (48, 40)
    factors = [(L, torch.zeros_like(R)) for L, R in random_factors(5, (6, 6, 6), shape)]  # D = 0
    left, right, err, info = run_factors(factors, shape, 4, refactor="best")
    assert err == 0.0 and not left.any() and not right.any() and info["refactor"] == "projection"


def test_bad_choice_is_refused():
    factors = random_factors(1, SMALL_RANKS, SMALL)
    with pytest.raises(ValueError, match="refactor"):
        run_factors(factors, SMALL, 4, refactor="svd")


# -- the merge, the manifest, the CLI, PEFT ------------------------------------------------------
SHAPES = lm_modules(layers=1, hidden=16, inter=24)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("best")
    dense = [write_adapter(root / f"a{i}", SHAPES, r=4, seed=20 + i) for i in range(3)]
    return root, [root / f"a{i}" for i in range(3)], dense


def read_back(out) -> dict[str, torch.Tensor]:
    t = load_file(str(out / "adapter_model.safetensors"))
    return {
        p: t[f"{PREFIX}{p}.lora_B.weight"].double() @ t[f"{PREFIX}{p}.lora_A.weight"].double()
        for p in SHAPES
    }


def plain_ties(dense: list[dict], path: str) -> torch.Tensor:
    trimmed = [ref_trim(d[path].numpy(), DENSITY) for d in dense]
    return torch.from_numpy(ref_ties_mix(trimmed, [1.0] * len(dense), True, 1.0))


def test_merge_records_the_choice_and_each_module(adapters, tmp_path):
    _, paths, dense = adapters
    base = merge("ties", paths, tmp_path / "p", params={"density": DENSITY}, rank=4)
    best = merge(
        "ties", paths, tmp_path / "b", params={"density": DENSITY}, rank=4, refactor="best"
    )
    man = json.loads((tmp_path / "b" / "emomerge.json").read_text())
    assert man["refactor_choice"] == "best" and base.manifest["refactor_choice"] == "projection"
    got = read_back(tmp_path / "b")
    for path in SHAPES:
        d = plain_ties(dense, path)
        how = man["refactor"][path]
        err = man["errors"]["relative_frobenius"][path]
        assert err == pytest.approx(rel(got[path], d), abs=1e-6)
        assert err <= base.errors[path] + 1e-6 and err <= how["projection_error"] + 1e-9
        assert how["refactor"] in ("svd", "projection")
        if how["refactor"] == "svd":  # these modules are small: the exact SVD, the optimum
            assert err == pytest.approx(optimum(d, 4), abs=1e-6)
    counts = {}
    for how in man["refactor"].values():
        counts[how["refactor"]] = counts.get(how["refactor"], 0) + 1
    summary = best.summary()
    for name, c in counts.items():
        assert f"{c} by {name}" in summary, summary


def test_merge_refuses_best_with_rank_auto_and_unknown_choices(adapters, tmp_path):
    _, paths, _ = adapters
    with pytest.raises(MergeInputError, match="--refactor best needs a fixed --rank"):
        merge(
            "ties",
            paths,
            tmp_path / "o",
            params={"density": DENSITY},
            rank="auto",
            max_error=0.3,
            refactor="best",
        )
    with pytest.raises(MergeInputError, match="--refactor must be projection or best"):
        merge("ties", paths, tmp_path / "o", params={"density": DENSITY}, refactor="optimal")
    assert not (tmp_path / "o").exists()


def run(args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


def one_error_line(r, needle):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and two PEFT LoRAs on it with random B (so the merge is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    for i in range(2):
        peft = get_peft_model(
            LlamaForCausalLM.from_pretrained(root / "base"),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        peft.save_pretrained(root / f"a{i}")
    return root


def test_cli_refactor_best_end_to_end_loads_in_peft(llama, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "m"
    r = run(
        [
            "ties",
            "--adapters",
            llama / "a0",
            llama / "a1",
            "--density",
            "0.5",
            "--rank",
            "4",
            "--refactor",
            "best",
            "--out",
            out,
        ]
    )
    assert r.exit_code == 0, r.output
    man = json.loads((out / "emomerge.json").read_text())
    assert man["refactor_choice"] == "best" and man["refactor"]
    assert all(
        h["refactor"] in ("svd", "randomized svd", "projection") and "projection_error" in h
        for h in man["refactor"].values()
    )
    assert "re-factorised: " in r.stdout and " by " in r.stdout
    # PEFT loads it, and folding it in adds exactly the written B @ A (scale 1) to each weight
    base = LlamaForCausalLM.from_pretrained(llama / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    folded = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    written = load_file(str(out / "adapter_model.safetensors"))
    modules = {
        k[len(PREFIX) : -len(".lora_A.weight")] for k in written if k.endswith(".lora_A.weight")
    }
    assert modules and len(modules) == len(man["refactor"])
    for m in modules:
        delta = written[f"{PREFIX}{m}.lora_B.weight"] @ written[f"{PREFIX}{m}.lora_A.weight"]
        np.testing.assert_allclose(
            (folded[f"{m}.weight"] - before[f"{m}.weight"]).numpy(), delta.numpy(), atol=1e-6
        )


def test_cli_bad_refactor_is_one_line(llama, tmp_path):
    a = [llama / "a0", llama / "a1"]
    one_error_line(
        run(
            [
                "ties",
                "--adapters",
                *a,
                "--density",
                "0.5",
                "--refactor",
                "bogus",
                "--out",
                tmp_path / "o",
            ]
        ),
        "--refactor must be projection or best, got 'bogus'",
    )
    one_error_line(
        run(
            [
                "ties",
                "--adapters",
                *a,
                "--density",
                "0.5",
                "--rank",
                "auto",
                "--max-error",
                "0.3",
                "--refactor",
                "best",
                "--out",
                tmp_path / "o",
            ]
        ),
        "--refactor best needs a fixed --rank",
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "emomerge,needle",
    [
        (
            {"rank": 4, "refactor": "bogus"},
            "key 'emomerge.refactor': must be 'projection' or 'best', got 'bogus'",
        ),
        (
            {"rank": "auto", "max_error": 0.3, "refactor": "best"},
            "key 'emomerge.refactor': best needs a fixed emomerge.rank",
        ),
    ],
)
def test_recipe_bad_refactor_is_one_line(llama, tmp_path, emomerge, needle):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "models": [
                    {"model": str(llama / f"a{i}"), "parameters": {"density": 0.5}}
                    for i in range(2)
                ],
                "emomerge": emomerge,
            }
        )
    )
    r = run(["merge", recipe, "--out", tmp_path / "o"])
    one_error_line(r, needle)
    assert str(recipe) in r.stderr and not (tmp_path / "o").exists()


def test_recipe_refactor_best_runs(llama, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "models": [
                    {"model": str(llama / f"a{i}"), "parameters": {"density": 0.5}}
                    for i in range(2)
                ],
                "emomerge": {"rank": 4, "refactor": "best"},
            }
        )
    )
    r = run(["merge", recipe, "--out", tmp_path / "o"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "emomerge.json").read_text())
    assert man["refactor_choice"] == "best" and man["recipe"]["emomerge"]["refactor"] == "best"
    assert all("projection_error" in h for h in man["refactor"].values())
