"""Adding a merge method is one function and one registry entry (DESIGN.md, How to add a method).

Two toy methods are registered for the length of a test (the fixture restores the registry):
a scaled sum with a parameter no shipped method has (linear, not streamable), and a top-k
trimmed sum without sign election (streamable). Each becomes a command of an app built after
registering, lists itself in ``emomerge methods``, and merges tiny adapters to what a plain dense
computation written here gives; the streamed path computes the streamable one and refuses the
other by name. Also: the streamed package names no method, and methods.py / svd_methods.py do
not import each other.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emomerge.cli_merge import expand_variadic
from emomerge.merging import registry, streaming
from emomerge.merging import sparsify as sp
from emomerge.merging.engine import apply_method, resolve_params
from emomerge.merging.methods import Consensus, MergeMethod, Param, Sparsifier, mix

from .helpers import lm_modules, write_adapter, write_base

MERGING = Path(__file__).resolve().parents[2] / "merging"
SHAPES = lm_modules(layers=1, hidden=8, inter=12)


# -- the toy methods: one function each ----------------------------------------------------
def scaled_sum(deltas: torch.Tensor, weights: torch.Tensor, *, scale: float = 2.0) -> torch.Tensor:
    """scale · Σ w_i τ_i."""
    return scale * (deltas * weights.to(deltas.dtype).reshape(-1, *[1] * (deltas.dim() - 1))).sum(0)


def trimmed_sum(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    density,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    """λ · Σ w_i top-k(τ_i): TIES' trimming without the sign election."""
    kept = torch.stack(
        [sp.magnitude(deltas[i], density[i], rescale=rescale) for i in range(deltas.shape[0])]
    )
    w = weights.to(deltas.dtype).reshape(-1, *[1] * (deltas.dim() - 1))
    return mix(kept * w, w, None, normalize=False, lambda_=lambda_)


SCALED = MergeMethod(
    "toy_scaled_sum",
    scaled_sum,
    "https://example.org/scaled-sum",
    "scale times the weighted sum",
    (registry._WEIGHT, Param("scale", float, 2.0, "Toy: factor of the sum.", low=0.0, high=10.0)),
    linear=True,
)
TRIMMED = MergeMethod(
    "toy_trimmed_sum",
    trimmed_sum,
    "https://example.org/trimmed-sum",
    "top-k trimming, then a sum",
    (registry._WEIGHT, registry._density(), registry._LAMBDA, registry._rescale(False)),
    sparsifier=Sparsifier.MAGNITUDE,
    consensus=Consensus.NONE,
    streamable=True,
)


@pytest.fixture()
def toys():
    """Registers the toy methods; the registry is restored afterwards."""
    saved = dict(registry.METHODS)
    try:
        yield registry.register(SCALED), registry.register(TRIMMED)
    finally:
        registry.METHODS.clear()
        registry.METHODS.update(saved)


def invoke(args):
    from emomerge.cli import build_app

    return CliRunner().invoke(build_app(), expand_variadic([str(a) for a in args]))


@pytest.fixture()
def world(tmp_path):
    dense = [
        write_adapter(tmp_path / name, SHAPES, seed=seed) for name, seed in (("a", 1), ("b", 2))
    ]
    base = write_base(tmp_path / "base", SHAPES)
    return tmp_path, dense, base


def merged_update(out: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: written weight − base weight} of a --output full folder (float64)."""
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {key[: -len(".weight")]: state[key].double() - t.double() for key, t in base.items()}


# -- (a) listed, (b) a command -------------------------------------------------------------
def test_a_registered_method_is_listed_and_is_a_command(toys):
    listed = invoke(["methods", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["method"]: row for row in json.loads(listed.stdout)}
    assert set(rows) >= {"toy_scaled_sum", "toy_trimmed_sum", "ties"}
    assert "scale = 2.0 (0, 10]" in rows["toy_scaled_sum"]["parameters (default, range)"]

    import typer

    from emomerge.cli import build_app

    commands = typer.main.get_command(build_app()).commands
    scale = {p.name: p for p in commands["toy-scaled-sum"].params}["scale"]
    assert not scale.hidden and "[method default 2.0, range (0, 10]]" in scale.help
    assert {p.name: p for p in commands["ties"].params}["scale"].hidden  # not a ties parameter


def test_a_bad_value_of_the_new_parameter_is_one_line(toys, world):
    root, _, _ = world
    r = invoke(
        [
            "toy-scaled-sum",
            "--adapters",
            root / "a",
            root / "b",
            "--scale",
            "11",
            "--out",
            root / "o",
        ]
    )
    assert r.exit_code == 2, r.output
    assert [line for line in r.stderr.splitlines() if line] == [
        "error: parameters: 'scale' must be in (0, 10], got 11.0"
    ]
    assert not (root / "o").exists()
    r = invoke(["ties", "--adapters", root / "a", root / "b", "--scale", "3", "--out", root / "o"])
    assert r.exit_code == 2 and "'scale' is not a parameter of ties" in r.stderr


# -- (c) merges tiny adapters as a plain dense computation says ------------------------------
def test_the_linear_toy_merges_as_written(toys, world):
    root, dense, base = world
    r = invoke(
        [
            "toy-scaled-sum",
            "--adapters",
            root / "a",
            root / "b",
            "--weights",
            "1",
            "0.5",
            "--scale",
            "3",
            "--output",
            "full",
            "--base",
            root / "base",
            "--out",
            root / "full",
        ]
    )
    assert r.exit_code == 0, r.output
    got = merged_update(root / "full", base)
    for path in SHAPES:
        want = 3 * (1.0 * dense[0][path] + 0.5 * dense[1][path])
        torch.testing.assert_close(got[path], want, rtol=0, atol=2e-6)
    # linear: adapter output is exact in low rank, no re-factorisation
    r = invoke(
        [
            "toy-scaled-sum",
            "--adapters",
            root / "a",
            root / "b",
            "--scale",
            "3",
            "--out",
            root / "lora",
        ]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((root / "lora" / "emomerge.json").read_text())
    assert manifest["method"] == "toy_scaled_sum" and manifest["errors"]["relative_frobenius"] == {}


# -- (d) the streamed path: computed when streamable, refused by name otherwise -------------
def test_the_streamable_toy_goes_through_the_streamed_path(toys, world, monkeypatch):
    root, dense, base = world
    calls = []
    real = streaming.merge_dense
    monkeypatch.setattr(
        streaming, "merge_dense", lambda m, *a, **k: calls.append(m.name) or real(m, *a, **k)
    )
    r = invoke(
        [
            "toy-trimmed-sum",
            "--adapters",
            root / "a",
            root / "b",
            "--weights",
            "1",
            "-0.5",
            "--density",
            "0.4",
            "--lambda",
            "2",
            "--output",
            "full",
            "--base",
            root / "base",
            "--out",
            root / "full",
        ]
    )
    assert r.exit_code == 0, r.output
    assert calls == ["toy_trimmed_sum"] * len(SHAPES)  # every module streamed
    got = merged_update(root / "full", base)
    for path in SHAPES:
        want = torch.zeros_like(dense[0][path])
        for w, d in zip((1.0, -0.5), dense):
            tau = d[path]
            k = max(1, int(0.4 * tau.numel()))
            keep = torch.zeros(tau.numel(), dtype=torch.bool)
            keep[tau.abs().reshape(-1).topk(k).indices] = True
            want += w * tau * keep.reshape(tau.shape)
        torch.testing.assert_close(got[path], 2 * want, rtol=0, atol=2e-6)


def random_factors(seed: int, n: int = 3, shape=(40, 56), rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("exact_below", [10**9, 0])  # dense selection / streamed selection
def test_streamed_toy_equals_its_function_and_the_other_is_refused(toys, exact_below):
    scaled, trimmed = toys
    factors = random_factors(5)
    deltas = torch.stack([left @ right for left, right in factors])
    resolved = resolve_params(
        trimmed, 3, {"density": [0.3, 0.5, 0.7], "weight": [1.0, 0.4, -2.0], "lambda": 0.8}
    )
    assert streaming.supports(trimmed, resolved) and streaming.supports("toy-trimmed-sum", resolved)
    got = streaming.merge_dense(
        trimmed, factors, (40, 56), resolved, block_rows=8, exact_below=exact_below
    )
    assert torch.equal(got, apply_method(trimmed, deltas, resolved, seed=0, module="m"))

    resolved = resolve_params(scaled, 3, {})
    assert not streaming.supports(scaled, resolved)
    with pytest.raises(ValueError, match="toy_scaled_sum: not a streamed method"):
        streaming.merge_dense(scaled, factors, (40, 56), resolved)


def test_the_streamed_plan_reads_the_fields_not_the_name(toys):
    """A copy of TIES under another name streams to the same bytes; a copy declaring no
    consensus streams to trimming without the election."""
    ties = registry.METHODS["ties"]
    alias = registry.register(replace(ties, name="toy_alias"))
    no_vote = registry.register(replace(ties, name="toy_no_vote", consensus=Consensus.NONE))
    factors = random_factors(9)
    resolved = resolve_params(ties, 3, {"density": 0.4, "weight": [1.0, 0.5, 2.0]})
    for exact_below in (10**9, 0):  # 0: plain TIES takes the single pass
        want = streaming.merge_dense("ties", factors, (40, 56), resolved, exact_below=exact_below)
        got = streaming.merge_dense(alias, factors, (40, 56), resolved, exact_below=exact_below)
        assert torch.equal(got, want)
        free = streaming.merge_dense(no_vote, factors, (40, 56), resolved, exact_below=exact_below)
        assert not torch.equal(free, want)  # the election changed something
        # its fn is still TIES': the plan followed the declared fields, here trim → Σ → ÷ Σw
        trimmed = torch.stack([sp.magnitude(left @ right, 0.4) for left, right in factors])
        w = torch.tensor([1.0, 0.5, 2.0]).reshape(-1, 1, 1)
        assert torch.equal(free, mix(trimmed * w, w, None, normalize=True, lambda_=1.0))


# -- the streamed package names no method; the method modules import each other ----------
def string_constants(source: str) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_the_streamed_package_names_no_method():
    names = set(registry.METHODS) | {n.replace("_", "-") for n in registry.METHODS}
    assert "ties" in string_constants('if name == "ties": pass') & names  # the check can fail
    files = sorted((MERGING / "streaming").glob("*.py"))
    assert {f.name for f in files} >= {
        "__init__.py",
        "plans.py",
        "selection.py",
        "single_pass.py",
        "projection.py",
    }
    found = {f.name: sorted(string_constants(f.read_text()) & names) for f in files}
    assert not any(found.values()), found
    assert not (MERGING / "streaming.py").exists()


def imported_modules(path: Path) -> set[str]:
    """The merging modules ``path`` imports (relative or absolute), by their last name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.startswith("emomerge.merging"):
                out.add(module.rsplit(".", 1)[-1] if module else "")
                out |= {a.name for a in node.names}  # "from . import svd_methods"
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[-1] for a in node.names if "merging" in a.name}
    return out


def test_methods_and_svd_methods_do_not_import_each_other():
    methods, svd = (
        imported_modules(MERGING / "methods.py"),
        imported_modules(MERGING / "svd_methods.py"),
    )
    assert "sparsify" in methods  # the check sees imports
    assert not {"svd_methods", "registry"} & methods, methods
    assert not {"methods", "registry"} & svd, svd
    assert {"methods", "svd_methods"} <= imported_modules(MERGING / "registry.py")


def test_every_streamable_method_is_declared_consistently():
    """The declared sparsifier matches the parameters the streamed plan reads."""
    needs = {
        Sparsifier.MAGNITUDE: {"density", "rescale"},
        Sparsifier.MAGNITUDE_OUTLIERS: {"density", "gamma", "rescale"},
        Sparsifier.RANDOM_DROP: {"density", "rescale"},
        Sparsifier.MAGPRUNE: {"density", "epsilon", "rescale"},
        Sparsifier.NONE: set(),
    }
    assert {s: set(s.reads) for s in Sparsifier} == needs
    streamed = [m for m in registry.METHODS.values() if m.streamable]
    assert {"linear", "ties", "dare_ties", "della", "breadcrumbs"} <= {m.name for m in streamed}
    for m in streamed:
        assert needs[m.sparsifier] <= {p.name for p in m.params}, m.name
        assert m.random == m.sparsifier.random, m.name


def test_a_streamable_entry_missing_what_its_plan_reads_is_refused_at_registration(toys):
    """Checked when the entry is added, not as a KeyError in the middle of a merge."""
    from dataclasses import replace

    lacking = replace(
        TRIMMED, name="toy_no_rescale", params=(registry._WEIGHT, registry._density())
    )
    with pytest.raises(ValueError, match=r"toy_no_rescale.*magnitude.*\['rescale'\]"):
        registry.register(lacking)
    assert "toy_no_rescale" not in registry.METHODS
