"""Bad input: one line on stderr naming the file and the problem, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


def run(args):
    return CliRunner().invoke(app, expand_variadic([str(a) for a in args]))


@pytest.fixture()
def ab(tmp_path):
    write_adapter(tmp_path / "a", SHAPES, seed=1)
    write_adapter(tmp_path / "b", SHAPES, seed=2)
    return tmp_path


def assert_one_line_error(result, *needles, out=None):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def test_truncated_safetensors(ab):
    f = ab / "b" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    r = run(["ties", "--adapters", ab / "a", ab / "b", "--density", "0.5", "--out", ab / "out"])
    assert_one_line_error(r, str(f), "truncated", out=ab / "out")


def test_corrupt_header(ab):
    f = ab / "a" / "adapter_model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "out"])
    assert_one_line_error(r, str(f), "safetensors", out=ab / "out")


def test_shape_mismatch(ab):
    write_adapter(ab / "c", lm_modules(layers=1, hidden=16, inter=12), seed=3)
    r = run(["task-arithmetic", "--adapters", ab / "a", ab / "c", "--out", ab / "out"])
    assert_one_line_error(r, "down_proj", "[16, 12]", "[8, 12]", "different bases", out=ab / "out")


def test_different_bases_need_allow_different_bases_not_force(ab):
    """--force replaces outputs only; adapters of different bases need --allow-different-bases
    (--allow-base-mismatch: the older spelling), recorded in the manifest."""
    write_adapter(ab / "c", SHAPES, seed=3, base="meta-llama/Llama-3.2-11B-Vision-Instruct")
    args = ["linear", "--adapters", ab / "a", ab / "c", "--out", ab / "out"]
    r = run(args)
    assert_one_line_error(
        r, "Llama-3.2-11B-Vision-Instruct", "--allow-different-bases", out=ab / "out"
    )
    r = run([*args, "--force"])
    line = assert_one_line_error(
        r, "Llama-3.2-11B-Vision-Instruct", "--allow-different-bases", out=ab / "out"
    )
    assert "--force" not in line
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run([*args, "--allow-different-bases"])
    assert r.exit_code == 0, r.output
    assert json.loads((ab / "out" / "emomerge.json").read_text())["allow_base_mismatch"] is True
    r = run([*args[:-1], ab / "old", "--allow-base-mismatch"])
    assert r.exit_code == 0, r.output
    # inspect: the same option (and no --force, which would mean nothing there)
    assert run(["inspect", ab / "a", ab / "c"]).exit_code == 2
    assert run(["inspect", ab / "a", ab / "c", "--allow-different-bases"]).exit_code == 0
    # --force there (its old meaning) is one line that names the option to use
    assert_one_line_error(
        run(["inspect", ab / "a", ab / "c", "--force"]), "--allow-different-bases"
    )


def test_quantized_base_counts_as_the_same_base(ab):
    write_adapter(ab / "q", SHAPES, seed=3, base="unsloth/Qwen2.5-VL-72B-Instruct-bnb-4bit")
    write_adapter(ab / "f", SHAPES, seed=4, base="Qwen/Qwen2.5-VL-72B-Instruct")
    assert run(["linear", "--adapters", ab / "q", ab / "f", "--out", ab / "out"]).exit_code == 0


def test_nan_names_the_tensor(ab):
    f = ab / "b" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    t = load_file(str(f))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    t[key][0, 0] = float("nan")
    save_file(t, str(f))
    r = run(["ties", "--adapters", ab / "a", ab / "b", "--density", "0.5", "--out", ab / "out"])
    assert_one_line_error(r, key, "NaN", out=ab / "out")


def test_missing_files(ab):
    r = run(["linear", "--adapters", ab / "a", ab / "nope", "--out", ab / "out"])
    assert_one_line_error(r, "nope", out=ab / "out")
    (ab / "b" / "adapter_config.json").unlink()
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "out"])
    assert_one_line_error(r, "adapter_config.json", out=ab / "out")


def test_unknown_method_and_bad_params(ab):
    r = run(["merge-everything", "--adapters", ab / "a", "--out", ab / "out"])
    assert r.exit_code == 2
    r = run(["ties", "--adapters", ab / "a", ab / "b", "--density", "0", "--out", ab / "out"])
    assert_one_line_error(r, "density", "(0, 1]", out=ab / "out")
    r = run(["ties", "--adapters", ab / "a", ab / "b", "--density", "1.5", "--out", ab / "out"])
    assert_one_line_error(r, "density", out=ab / "out")
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--density", "0.5", "--out", ab / "out"])
    assert_one_line_error(r, "'density' is not a parameter of linear", out=ab / "out")
    r = run(
        ["ties", "--adapters", ab / "a", ab / "b", "--weights", "1", "2", "3", "--out", ab / "out"]
    )
    assert_one_line_error(r, "--weights has 3 values for 2 adapters", out=ab / "out")


def test_pickle_refused_unless_allowed(ab):
    from safetensors.torch import load_file

    t = load_file(str(ab / "b" / "adapter_model.safetensors"))
    (ab / "b" / "adapter_model.safetensors").unlink()
    torch.save(t, ab / "b" / "adapter_model.bin")
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "out"])
    assert_one_line_error(r, "adapter_model.bin", "--allow-pickle", out=ab / "out")
    assert (
        run(
            ["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "out", "--allow-pickle"]
        ).exit_code
        == 0
    )


def test_dora_and_other_peft_types_refused(ab):
    cfg = json.loads((ab / "b" / "adapter_config.json").read_text())
    (ab / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert_one_line_error(
        run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "o"]), "DoRA"
    )
    (ab / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert_one_line_error(
        run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "o"]), "IA3"
    )


def test_existing_out_refused_without_force(ab):
    (ab / "out").mkdir()
    (ab / "out" / "keep.txt").write_text("mine")
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "out"])
    assert_one_line_error(r, "already exists", "--force")
    assert (ab / "out" / "keep.txt").read_text() == "mine"


def test_failure_mid_write_leaves_nothing(ab, monkeypatch):
    from emomerge.merging import engine

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine, "write_full_output", boom)
    write_base(ab / "base", SHAPES)
    with pytest.raises(RuntimeError):
        engine.merge("linear", [ab / "a", ab / "b"], ab / "out", output="full", base=ab / "base")
    assert not (ab / "out").exists()
    assert sorted(p.name for p in ab.iterdir()) == ["a", "b", "base"]


def test_full_output_needs_base(ab):
    assert_one_line_error(
        run(["linear", "--adapters", ab / "a", ab / "b", "--output", "full", "--out", ab / "o"]),
        "--base",
    )


def test_console_script_end_to_end(ab):
    """The real entry point, with --adapters taking several values."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from emomerge.cli import main; main()",
            "ties",
            "--adapters",
            str(ab / "a"),
            str(ab / "b"),
            "--weights",
            "0.7",
            "0.3",
            "--density",
            "0.5",
            "--out",
            str(ab / "m"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((ab / "m" / "emomerge.json").read_text())
    assert manifest["params"]["weight"] == [0.7, 0.3]
    assert manifest["params"]["density"] == [0.5, 0.5]
    assert [a["sha256"] for a in manifest["adapters"]][0] and len(manifest["adapters"]) == 2
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from emomerge.cli import main; main()",
            "ties",
            "--adapters",
            str(ab / "a"),
            "--density",
            "7",
            "--out",
            str(ab / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_rank_auto_and_max_error_checked(ab):
    adapters = ["ties", "--adapters", ab / "a", ab / "b", "--density", "0.5", "--out", ab / "out"]
    r = run(adapters + ["--max-error", "0.1"])
    assert_one_line_error(r, "--max-error needs --rank auto", out=ab / "out")
    r = run(adapters + ["--rank", "8", "--max-error", "0.1"])
    assert_one_line_error(r, "--max-error needs --rank auto", out=ab / "out")
    r = run(adapters + ["--rank", "auto"])
    assert_one_line_error(r, "--rank auto needs --max-error", out=ab / "out")
    for bad in ("0", "1", "1.5", "-0.1", "nan", "inf"):
        r = run(adapters + ["--rank", "auto", "--max-error", bad])
        assert_one_line_error(r, "--max-error must be a number in (0, 1)", out=ab / "out")
    r = run(adapters + ["--rank", "sixteen"])
    assert_one_line_error(
        r, "--rank must be a positive integer or auto", "'sixteen'", out=ab / "out"
    )
    r = run(adapters + ["--rank", "0"])
    assert_one_line_error(r, "--rank must be a positive integer", out=ab / "out")


def _dense_ties(ab, density, path):
    """TIES of the two test adapters' ΔW, from the plain method (the reference of the warning)."""
    from safetensors.torch import load_file

    from emomerge.merging.engine import apply_method, get_method, resolve_params

    deltas = []
    for name in ("a", "b"):
        t = load_file(str(ab / name / "adapter_model.safetensors"))
        cfg = json.loads((ab / name / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        deltas.append(
            scale
            * t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
    m = get_method("ties")
    return apply_method(
        m, torch.stack(deltas), resolve_params(m, 2, {"density": density}), seed=0, module=path
    )


def test_warning_when_the_adapter_is_far_from_the_merge(ab):
    """TIES at density 0.5 re-factorised to the input rank (4) is far from TIES: one warning
    line naming the mean error (recomputed here from the written factors and the dense TIES)."""
    from safetensors.torch import load_file

    r = run(["ties", "--adapters", ab / "a", ab / "b", "--density", "0.5", "--out", ab / "m"])
    assert r.exit_code == 0, r.output
    t = load_file(str(ab / "m" / "adapter_model.safetensors"))
    errors = []
    for path in SHAPES:
        got = (
            t[f"base_model.model.{path}.lora_B.weight"].double()
            @ t[f"base_model.model.{path}.lora_A.weight"].double()
        )
        d = _dense_ties(ab, 0.5, path)
        errors.append(float(torch.linalg.matrix_norm(got - d) / torch.linalg.matrix_norm(d)))
    mean = sum(errors) / len(errors)
    assert mean > 0.10
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1, r.stderr
    assert f"mean relative error of {mean:.1%}" in lines[0]
    assert "--output full" in lines[0] and "--rank auto --max-error" in lines[0]
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("warning:")]


def test_no_warning_when_the_adapter_is_close(ab):
    """High density at a rank as large as the module: the error is ~0, no warning."""
    r = run(
        [
            "ties",
            "--adapters",
            ab / "a",
            ab / "b",
            "--density",
            "0.99",
            "--rank",
            "8",
            "--out",
            ab / "m",
        ]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((ab / "m" / "emomerge.json").read_text())
    assert manifest["errors"]["mean"] < 1e-5
    assert "warning:" not in r.stderr
    # --rank auto: the user chose the bound, no warning even above 10 %
    r = run(
        [
            "ties",
            "--adapters",
            ab / "a",
            ab / "b",
            "--density",
            "0.5",
            "--rank",
            "auto",
            "--max-error",
            "0.4",
            "--out",
            ab / "auto",
        ]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((ab / "auto" / "emomerge.json").read_text())
    assert (
        manifest["rank_rule"] == "auto, max_error 0.4" and 0.1 < manifest["errors"]["mean"] <= 0.4
    )
    assert "warning:" not in r.stderr and "max_error 0.4" in r.stdout
    # linear methods are exact: never a warning
    r = run(["linear", "--adapters", ab / "a", ab / "b", "--out", ab / "lin"])
    assert r.exit_code == 0 and "warning:" not in r.stderr


def test_a_short_option_ends_the_adapter_list(ab):
    """``--adapters a b -o out``: -o is the output option, not a third adapter; negative
    numbers stay values of a list option."""
    assert expand_variadic(["ties", "--adapters", "a", "b", "-o", "out", "--weights", "1", "-0.5"]) == [
        "ties", "--adapters", "a", "--adapters", "b", "-o", "out",
        "--weights", "1", "--weights", "-0.5",
    ]  # fmt: skip
    r = run(["ties", "--adapters", ab / "a", ab / "b", "-o", ab / "out", "--density", "0.5"])
    assert r.exit_code == 0, r.output
    made = json.loads((ab / "out" / "emomerge.json").read_text())
    assert [Path(a["path"]).name for a in made["adapters"]] == ["a", "b"]
