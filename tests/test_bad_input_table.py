"""Bad input through every command, in one table: one line on stderr, exit 2, nothing written.

Each row is a command line, the first words of the one ``error:`` line it must print, and the
promise that nothing appears (or changes) at or beside its output path: no temporary folder, no
lock file, no half-written output. Every broken input is built once per module under one
folder, and that whole folder is compared before and after each row, so a row that writes
anywhere (beside ``--out``, into an input, into the data) fails.

The narrower suites (tests/merging/test_cli_errors.py, test_out_safety.py, test_silent_inputs.py,
tests/training/test_bad_input.py, tests/evaluation/test_eval_cli.py) test each family in depth;
this table is the one place that shows all commands at once. Rows run in-process (CliRunner);
the subprocess row at the end checks the real console script prints the same one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.cli_merge import expand_variadic
from emomerge.merging.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILY = "qwen2_5_vl"


# ---------------------------------------------------------------- fixtures (built once)


def _stage(
    base: Path, out: Path, *, seed: int, stage: str, index: int, parent: Path | None
) -> Path:
    """A PEFT stage adapter of ``base`` with the emomerge.json training writes (base hash too)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from emomerge.merging.adapters import sha256_file
    from emomerge.merging.checkpoint import Checkpoint
    from emomerge.merging.lineage import BaseIdentity, Lineage, StageMetadata, write_stage_metadata
    from emomerge.training.models.families import LM_ONLY_REGEX

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LM_ONLY_REGEX, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    lineage = Lineage()
    if parent is not None:
        lineage = Lineage(
            mode="continued",
            parent=f"../{parent.name}",
            parent_sha256=sha256_file(parent / "adapter_model.safetensors"),
        )
    write_stage_metadata(
        out,
        StageMetadata(
            stage=stage,
            stage_index=index,
            lineage=lineage,
            seed=seed,
            steps=0,
            base=BaseIdentity(
                name_or_path=str(base), hash=Checkpoint(base).fingerprint(), family=FAMILY
            ),
        ),
    )
    return out


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class World:
    """Every input of the table, under ``root``."""

    root: Path
    base: Path
    other_base: Path
    s1: Path
    s2: Path
    trunc: Path
    corrupt: Path
    nan: Path
    shape: Path
    pickled: Path
    dora: Path
    lineage_child: Path
    emoart: Path
    emocomics: Path
    recipe: Path
    leaderboard: Path

    def out(self, case: str) -> Path:
        return self.root / "outs" / case / "out"

    def p(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    import torch
    import yaml

    from emomerge.evaluation.leaderboard import upsert_rows
    from emomerge.training.data.synthetic import write_synthetic
    from emomerge.training.models.tiny import build_tiny_vlm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad-input")
    base = build_tiny_vlm(FAMILY, root / "tiny-qwen2_5_vl", seed=0)
    # same architecture and shapes, other weights: only the recorded hash tells them apart
    other = build_tiny_vlm(FAMILY, root / "other" / "tiny-qwen2_5_vl", seed=1)
    ad = root / "adapters"
    s1 = _stage(base, ad / "emoart", seed=1, stage="emoart", index=0, parent=None)
    s2 = _stage(base, ad / "emocomics35", seed=2, stage="emocomics35", index=1, parent=s1)

    bad = root / "bad"
    trunc = _copy(s2, bad / "trunc")
    f = trunc / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    corrupt = _copy(s2, bad / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
    nan = _copy(s2, bad / "nan")
    first = {}

    def poison(t):
        key = min(k for k in t if k.endswith("lora_B.weight"))
        first["key"] = key
        t[key][0, 0] = float("nan")

    _edit_tensors(nan, poison)
    shape = _copy(s2, bad / "shape")

    def widen(t):  # a LoRA pair of another model: its A reads a wider input
        key = min(k for k in t if k.endswith("lora_A.weight"))
        t[key] = torch.randn(t[key].shape[0], t[key].shape[1] + 4)

    _edit_tensors(shape, widen)
    pickled = _copy(s1, bad / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    dora = _copy(s1, bad / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    # a continued child whose recorded parent hash is not its parent's
    lin = bad / "lineage"
    _copy(s1, lin / "emoart")
    child = _copy(s2, lin / "emocomics35")
    meta = json.loads((child / "emomerge.json").read_text())
    meta["lineage"]["parent_sha256"] = "0" * 64
    (child / "emomerge.json").write_text(json.dumps(meta))
    # stages recorded on the other base (its hash), evaluated on `base`
    foreign = _copy(s1, bad / "foreign")
    meta = json.loads((foreign / "emomerge.json").read_text())
    from emomerge.merging.checkpoint import Checkpoint

    meta["base"] = {
        "name_or_path": str(other),
        "hash": Checkpoint(other).fingerprint(),
        "family": FAMILY,
    }
    (foreign / "emomerge.json").write_text(json.dumps(meta))

    data = root / "data"
    emoart = write_synthetic("emoart", data / "emoart", n=20, seed=0)
    emocomics = write_synthetic("emocomics35", data / "emocomics35", n=8, seed=0)

    files = root / "files"
    files.mkdir()
    recipe = files / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "models": [
                    {"model": str(s1), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": str(s2), "parameters": {"weight": 1.0, "density": 0.5}},
                ],
            }
        )
    )
    for name, text in {
        "undecodable.yaml": b"merge_method: ties\nmodels:\n  - model: a\xff\xfe\n",
        "not-yaml.yaml": b"merge_method: [ties\nmodels: {\n",
        "unknown-method.yaml": f"merge_method: frankenmerge\nmodels:\n  - model: {s1}\n".encode(),
        "typo.yaml": f"merge_method: ties\nmodles:\n  - model: {s1}\n".encode(),
        "nan.yaml": (
            f"merge_method: ties\nmodels:\n  - model: {s1}\n  - model: {s2}\n"
            "parameters: {density: .nan}\n"
        ).encode(),
        "refactor-bogus.yaml": (
            f"merge_method: ties\nmodels:\n  - model: {s1}\n  - model: {s2}\n"
            "emomerge: {rank: 4, refactor: bogus}\n"
        ).encode(),
        "missing-model.yaml": f"merge_method: linear\nmodels:\n  - model: {root}/nope\n".encode(),
        "curriculum-latin1.yaml": b"base_model: m\n\xff\xfe stages: []\n",
        "curriculum-not-yaml.yaml": b"base_model: [m\nstages: {\n",
        "experiment-latin1.yaml": b"name: x\n\xe9t\xe9: 1\n",
        "experiment-not-yaml.yaml": b"name: [x\n",
        "plot.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "latin1.csv": "variant,macro_f1\nd\xe9j\xe0,0.5\n".encode("latin-1"),
        "other.csv": b"a,b\n1,2\n",
        "header-only.csv": b"",
        "notes.txt": b"my notes\n",
    }.items():
        (files / name).write_bytes(text)
    (files / "curriculum-missing-model.yaml").write_text(
        yaml.safe_dump(
            {
                "base_model": "./no-such-model",
                "stages": [
                    {"name": "emoart", "dataset": "emoart", "path": str(emoart), "steps": 1}
                ],
            }
        )
    )
    (files / "curriculum-unknown-key.yaml").write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "stepz": 3,
                "stages": [
                    {"name": "emoart", "dataset": "emoart", "path": str(emoart), "steps": 1}
                ],
            }
        )
    )
    (files / "experiment-unknown-key.yaml").write_text("name: x\nfrobnicate: 1\n")
    lb = files / "leaderboard.csv"
    upsert_rows(
        lb,
        [
            {
                "architecture": FAMILY,
                "base_id": "tiny",
                "variant": "s1",
                "kind": "stage",
                "dataset": "emoart",
                "split": "test",
                "task": "single",
                "n": 10,
                "macro_f1": 0.4,
                "macro_f1_lo": 0.3,
                "macro_f1_hi": 0.5,
                "config_hash": "c1",
            }
        ],
    )
    (files / "header-only.csv").write_text(
        ",".join(__import__("emomerge.evaluation.leaderboard", fromlist=["COLUMNS"]).COLUMNS) + "\n"
    )
    # outputs that are in the way: a file, a non-empty folder, a stage, a results folder whose
    # leaderboard is not one
    outs = root / "taken"
    outs.mkdir()
    (outs / "file").write_text("keep me\n")
    (outs / "full").mkdir()
    (outs / "full" / "keep.txt").write_text("mine\n")
    (outs / "runfolder").mkdir()  # an `emomerge run` folder: its leaderboard is the run's own
    (outs / "runfolder" / "experiment.json").write_text("{}")
    (outs / "runfolder" / "leaderboard.csv").write_text("")
    (outs / "badresults").mkdir()
    (outs / "badresults" / "leaderboard.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    _copy(s1, outs / "stage")
    return World(
        root,
        base,
        other,
        s1,
        s2,
        trunc,
        corrupt,
        nan,
        shape,
        pickled,
        dora,
        child,
        emoart,
        emocomics,
        recipe,
        lb,
    )


# ---------------------------------------------------------------- the table
#
# A row: (id, argv builder, first words of the error line). The builder gets the World and the
# row's own output path (``w.out(id)``, under a folder of its own).


def _merge(method, *adapters, extra=()):
    return lambda w, out: [method, "--adapters", *[a(w) for a in adapters], *extra, "--out", out]


def S1(w):
    return w.s1


def S2(w):
    return w.s2


def _eval(*extra, variants=(S1, S2), out=None):
    def argv(w, o):
        return [
            "evaluate",
            "--base",
            w.base,
            "--data",
            w.emoart,
            "--dataset",
            "emoart",
            "--split",
            "test",
            "--variants",
            *[v(w) for v in variants],
            "--out",
            out(w) if out else o,
            "--n-boot",
            "20",
            *extra,
        ]

    return argv


ROWS = [
    # --- one command per merge method ---------------------------------------------------------
    (
        "ties-truncated",
        _merge("ties", S1, lambda w: w.trunc, extra=["--density", "0.5"]),
        lambda w: f"{w.trunc}/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "linear-corrupt-header",
        _merge("linear", S1, lambda w: w.corrupt),
        lambda w: f"{w.corrupt}/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "task-arithmetic-nan",
        _merge("task-arithmetic", S1, lambda w: w.nan),
        lambda w: f"{w.nan}/adapter_model.safetensors: tensor",
    ),
    (
        "linear-shape",
        _merge("linear", S1, lambda w: w.shape),
        lambda w: f"{w.shape}/adapter_model.safetensors: module",
    ),
    (
        "linear-missing-adapter",
        _merge("linear", S1, lambda w: w.p("nope")),
        lambda w: f"{w.p('nope')}: no such adapter folder",
    ),
    (
        "linear-pickle",
        _merge("linear", S1, lambda w: w.pickled),
        lambda w: f"{w.pickled}/adapter_model.bin: pickled weights can run code",
    ),
    (
        "linear-dora",
        _merge("linear", S1, lambda w: w.dora),
        lambda w: f"{w.dora}/adapter_config.json: DoRA adapters",
    ),
    (
        "ties-density-1.5",
        _merge("ties", S1, S2, extra=["--density", "1.5"]),
        "parameters: 'density' must be",
    ),
    (
        "ties-density-nan",
        _merge("ties", S1, S2, extra=["--density", "nan"]),
        "parameters: 'density' must be a finite number, got nan",
    ),
    (
        "task-arithmetic-lambda-inf",
        _merge("task-arithmetic", S1, S2, extra=["--lambda", "inf"]),
        "parameters: 'lambda' must be a finite number, got inf",
    ),
    (
        "breadcrumbs-gamma-nan",
        _merge("breadcrumbs", S1, S2, extra=["--density", "0.5", "--gamma", "nan"]),
        "parameters: 'gamma' must be a finite number",
    ),
    (
        "della-epsilon-inf",
        _merge("della", S1, S2, extra=["--density", "0.5", "--epsilon", "-inf"]),
        "parameters: 'epsilon' must be a finite number",
    ),
    (
        "tsv-fraction-nan",
        _merge("tsv", S1, S2, extra=["--fraction", "nan"]),
        "parameters: 'fraction' must be a finite number",
    ),
    (
        "linear-weights-count",
        _merge("linear", S1, S2, extra=["--weights", "1", "2", "3"]),
        "--weights has 3 values for 2 adapters",
    ),
    (
        "linear-weight-nan",
        _merge("linear", S1, S2, extra=["--weights", "nan", "1"]),
        "parameters: 'weight' must be a finite number, got nan",
    ),
    (
        "linear-density-not-a-param",
        _merge("linear", S1, S2, extra=["--density", "0.5"]),
        "parameters: 'density' is not a parameter of linear",
    ),
    (
        "ties-rank-word",
        _merge("ties", S1, S2, extra=["--density", "0.5", "--rank", "sixteen"]),
        "--rank must be a positive integer or auto",
    ),
    (
        "ties-max-error-nan",
        _merge("ties", S1, S2, extra=["--density", "0.5", "--rank", "auto", "--max-error", "nan"]),
        "--max-error must be a number in (0, 1)",
    ),
    (
        "ties-refactor-word",
        _merge("ties", S1, S2, extra=["--density", "0.5", "--refactor", "bogus"]),
        "--refactor must be projection or best, got 'bogus'",
    ),
    (
        "ties-refactor-best-rank-auto",
        _merge(
            "ties",
            S1,
            S2,
            extra=[
                "--density",
                "0.5",
                "--rank",
                "auto",
                "--max-error",
                "0.3",
                "--refactor",
                "best",
            ],
        ),
        "--refactor best needs a fixed --rank",
    ),
    (
        "dare-ties-rescale-word",
        _merge("dare-ties", S1, S2, extra=["--density", "0.5", "--rescale", "maybe"]),
        "--rescale must be true, false or density",
    ),
    (
        "linear-output-full-no-base",
        _merge("linear", S1, S2, extra=["--output", "full"]),
        "--output full needs --base",
    ),
    (
        "linear-output-weird",
        _merge("linear", S1, S2, extra=["--output", "zip"]),
        "--output must be",
    ),
    (
        "linear-reference-weird",
        _merge("linear", S1, S2, extra=["--reference", "sideways"]),
        "--reference must be 'base' or 'previous'",
    ),
    (
        "linear-dtype-weird",
        _merge("linear", S1, S2, extra=["--dtype", "float8"]),
        "--dtype must be",
    ),
    (
        "linear-layout-weird",
        _merge("linear", S1, S2, extra=["--layout", "sideways"]),
        "--layout must be",
    ),
    (
        "ties-space-weird",
        _merge("ties", S1, S2, extra=["--density", "0.5", "--space", "nowhere"]),
        "parameters: 'space'",
    ),
    ("ties-seed-word", _merge("ties", S1, S2, extra=["--seed", "x"]), "Invalid value for '--seed'"),
    (
        "linear-unknown-option",
        _merge("linear", S1, S2, extra=["--frobnicate"]),
        "No such option: --frobnicate",
    ),
    (
        "unknown-command",
        lambda w, out: ["merge-everything", "--adapters", w.s1, "--out", out],
        "No such command 'merge-everything'",
    ),
    (
        "lineage-parent-changed",
        lambda w, out: [
            "task-arithmetic",
            "--adapters",
            w.lineage_child.parent / "emoart",
            w.lineage_child,
            "--reference",
            "previous",
            "--out",
            out,
        ],
        lambda w: f"{w.lineage_child.parent / 'emoart'}",
    ),
    (
        "full-output-other-base",
        lambda w, out: [
            "linear",
            "--adapters",
            w.s1,
            w.s2,
            "--output",
            "full",
            "--base",
            w.p("files"),
            "--out",
            out,
        ],
        lambda w: f"{w.p('files')}: no config.json",
    ),
    # --- where the output goes ----------------------------------------------------------------
    ("out-is-a-file", _merge("linear", S1, S2), None),  # argv patched below
    ("out-not-empty", None, None),
    ("out-is-an-input-force", None, None),
    ("out-is-a-stage-force", None, None),
    ("out-locked", None, None),
    # --- merge RECIPE ---------------------------------------------------------------------------
    (
        "recipe-undecodable",
        lambda w, out: ["merge", w.p("files/undecodable.yaml"), "--out", out],
        lambda w: f"{w.p('files/undecodable.yaml')}: not a UTF-8 text file",
    ),
    (
        "recipe-not-yaml",
        lambda w, out: ["merge", w.p("files/not-yaml.yaml"), "--out", out],
        lambda w: f"{w.p('files/not-yaml.yaml')}:",
    ),
    (
        "recipe-unknown-method",
        lambda w, out: ["merge", w.p("files/unknown-method.yaml"), "--out", out],
        lambda w: f"{w.p('files/unknown-method.yaml')}:",
    ),
    (
        "recipe-unknown-key",
        lambda w, out: ["merge", w.p("files/typo.yaml"), "--out", out],
        lambda w: f"{w.p('files/typo.yaml')}:",
    ),
    (
        "recipe-nan",
        lambda w, out: ["merge", w.p("files/nan.yaml"), "--out", out],
        lambda w: f"{w.p('files/nan.yaml')}:",
    ),
    (
        "recipe-refactor-bogus",
        lambda w, out: ["merge", w.p("files/refactor-bogus.yaml"), "--out", out],
        lambda w: (
            f"{w.p('files/refactor-bogus.yaml')}: key 'emomerge.refactor': must be 'projection' or 'best'"
        ),
    ),
    (
        "recipe-missing-model",
        lambda w, out: ["merge", w.p("files/missing-model.yaml"), "--out", out],
        lambda w: f"{w.p('nope')}: no such adapter folder",
    ),
    (
        "recipe-missing",
        lambda w, out: ["merge", w.p("files/absent.yaml"), "--out", out],
        lambda w: f"{w.p('files/absent.yaml')}",
    ),
    (
        "recipe-out-is-the-recipe",
        lambda w, out: ["merge", w.recipe, "--out", w.recipe, "--force"],
        lambda w: f"{w.recipe}",
    ),
    # --- export-mergekit ------------------------------------------------------------------------
    (
        "export-undecodable",
        lambda w, out: [
            "export-mergekit",
            w.p("files/undecodable.yaml"),
            "--base",
            w.base,
            "--out",
            out,
        ],
        lambda w: f"{w.p('files/undecodable.yaml')}: not a UTF-8 text file",
    ),
    (
        "export-out-is-the-recipe",
        lambda w, out: [
            "export-mergekit",
            w.recipe,
            "--base",
            w.base,
            "--out",
            w.recipe,
            "--force",
        ],
        lambda w: f"{w.recipe}",
    ),
    (
        "export-out-is-another-file",
        lambda w, out: [
            "export-mergekit",
            w.recipe,
            "--base",
            w.base,
            "--out",
            w.p("files/notes.txt"),
            "--force",
        ],
        lambda w: f"{w.p('files/notes.txt')}",
    ),
    (
        "export-nothing-to-export",
        lambda w, out: ["export-mergekit", "--base", w.base, "--out", out],
        "export-mergekit needs a RECIPE or --method and --adapters",
    ),
    # --- inspect, methods -----------------------------------------------------------------------
    (
        "inspect-missing",
        lambda w, out: ["inspect", w.p("nope")],
        lambda w: f"{w.p('nope')}: no such adapter folder",
    ),
    (
        "inspect-truncated",
        lambda w, out: ["inspect", w.s1, w.trunc],
        lambda w: f"{w.trunc}/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "inspect-nan",
        lambda w, out: ["inspect", w.s1, w.nan],
        lambda w: f"{w.nan}/adapter_model.safetensors: tensor",
    ),
    (
        "inspect-reference-weird",
        lambda w, out: ["inspect", w.s1, "--reference", "sideways"],
        "--reference must be 'base' or 'previous'",
    ),
    ("methods-unknown-option", lambda w, out: ["methods", "--all"], "No such option: --all"),
    # --- train, data ----------------------------------------------------------------------------
    (
        "train-curriculum-latin1",
        lambda w, out: [
            "train",
            w.p("files/curriculum-latin1.yaml"),
            "--out",
            out,
            "--no-progress",
        ],
        lambda w: f"{w.p('files/curriculum-latin1.yaml')}: not a UTF-8 text file",
    ),
    (
        "train-curriculum-not-yaml",
        lambda w, out: [
            "train",
            w.p("files/curriculum-not-yaml.yaml"),
            "--out",
            out,
            "--no-progress",
        ],
        lambda w: f"{w.p('files/curriculum-not-yaml.yaml')}:",
    ),
    (
        "train-curriculum-unknown-key",
        lambda w, out: [
            "train",
            w.p("files/curriculum-unknown-key.yaml"),
            "--out",
            out,
            "--no-progress",
        ],
        lambda w: f"{w.p('files/curriculum-unknown-key.yaml')}:",
    ),
    (
        "train-missing-local-model",
        lambda w, out: [
            "train",
            w.p("files/curriculum-missing-model.yaml"),
            "--out",
            out,
            "--no-progress",
        ],
        lambda w: f"{w.p('files/curriculum-missing-model.yaml')}: key 'base_model'",
    ),
    (
        "train-curriculum-missing",
        lambda w, out: ["train", w.p("files/absent.yaml"), "--out", out],
        lambda w: f"{w.p('files/absent.yaml')}",
    ),
    (
        "train-bad-image-share",
        lambda w, out: ["train", w.recipe, "--out", out, "--max-bad-image-share", "2"],
        "Invalid value for '--max-bad-image-share'",
    ),
    (
        "data-synthetic-unknown",
        lambda w, out: ["data", "synthetic", "emotions9", out],
        "no synthetic writer for 'emotions9'",
    ),
    (
        "data-inspect-unknown",
        lambda w, out: ["data", "inspect", "emotions9", w.emoart],
        "unknown dataset",
    ),
    (
        "data-inspect-missing",
        lambda w, out: ["data", "inspect", "emoart", w.p("nope")],
        lambda w: f"{w.p('nope')}",
    ),
    (
        "data-inspect-wrong-format",
        lambda w, out: ["data", "inspect", "emocomics35", w.emoart],
        lambda w: f"{w.emoart}",
    ),
    # --- evaluate -------------------------------------------------------------------------------
    (
        "evaluate-threshold-2",
        _eval("--threshold", "2.0"),
        "--threshold: must be a number in [0, 1], got 2.0",
    ),
    (
        "evaluate-threshold-nan",
        _eval("--threshold", "nan"),
        "--threshold: must be a number in [0, 1], got nan",
    ),
    (
        "evaluate-val-fraction-0",
        _eval("--val-fraction", "0"),
        "--val-fraction: must be a number in (0, 1), got 0.0",
    ),
    (
        "evaluate-val-fraction-inf",
        _eval("--val-fraction", "inf"),
        "--val-fraction: must be a number in (0, 1), got inf",
    ),
    ("evaluate-n-boot-5", _eval("--n-boot", "5"), "--n-boot: must be at least 10, got 5"),
    ("evaluate-batch-size-0", _eval("--batch-size", "0"), "--batch-size: must be at least 1"),
    (
        "evaluate-max-new-tokens-0",
        _eval("--max-new-tokens", "0"),
        "--max-new-tokens: must be at least 1, got 0",
    ),
    ("evaluate-max-labels-0", _eval("--max-labels", "0"), "--max-labels: must be at least 1"),
    ("evaluate-seed-negative", _eval("--seed", "-1"), "--seed: must be at least 0, got -1"),
    ("evaluate-mode-beam", _eval("--mode", "beam"), "--mode: expected one of"),
    ("evaluate-n-boot-word", _eval("--n-boot", "many"), "Invalid value for '--n-boot'"),
    (
        "evaluate-nan-variant",
        _eval(variants=(S1, lambda w: w.nan)),
        lambda w: f"{w.nan}/adapter_model.safetensors: tensor",
    ),
    (
        "evaluate-truncated-variant",
        _eval(variants=(S1, lambda w: w.trunc)),
        lambda w: f"{w.trunc}/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "evaluate-corrupt-variant",
        _eval(variants=(lambda w: w.corrupt,)),
        lambda w: f"{w.corrupt}/adapter_model.safetensors: not a readable safetensors file",
    ),
    (
        "evaluate-shape-variant",
        _eval(variants=(lambda w: w.shape,)),
        lambda w: (
            f"{w.shape}: does not fit the base: {w.base}: 'model.layers.0.mlp.down_proj.weight' "
            "is [64, 128] but the adapters update a [64, 132] weight"
        ),
    ),
    (
        "evaluate-other-base",
        _eval(variants=(S1, lambda w: w.p("bad/foreign"))),
        lambda w: f"{w.p('bad/foreign')}: recorded as trained on '{w.other_base}'",
    ),
    (
        "evaluate-missing-variant",
        _eval(variants=(lambda w: w.p("nope"),)),
        lambda w: f"{w.p('nope')}: no such file or directory",
    ),
    ("evaluate-unknown-baseline", _eval("--baseline", "nope"), "--baseline: 'nope'"),
    (
        "evaluate-judge-without-model",
        lambda w, out: [
            "evaluate",
            "--base",
            w.base,
            "--data",
            w.emoart,
            "--dataset",
            "mangavqa",
            "--judge-url",
            "http://localhost:1",
            "--out",
            out,
        ],
        "--judge-url needs --judge-model",
    ),
    (
        "evaluate-data-missing",
        lambda w, out: [
            "evaluate",
            "--base",
            w.base,
            "--data",
            w.p("nope"),
            "--dataset",
            "emoart",
            "--out",
            out,
        ],
        lambda w: f"{w.p('nope')}",
    ),
    (
        "evaluate-out-is-a-file",
        _eval(out=lambda w: w.p("taken/file")),
        lambda w: f"--out {w.p('taken/file')}: is a file",
    ),
    (
        "evaluate-out-is-a-stage",
        _eval(out=lambda w: w.p("taken/stage")),
        lambda w: f"--out {w.p('taken/stage')}: is an adapter folder",
    ),
    (
        "evaluate-out-is-a-run-folder",
        _eval(out=lambda w: w.p("taken/runfolder")),
        lambda w: f"--out {w.p('taken/runfolder')}: is an `emomerge run` folder",
    ),
    (
        "evaluate-out-inside-an-input",
        _eval(out=lambda w: w.s1 / "results"),
        lambda w: f"--out {w.s1 / 'results'}: is inside the input",
    ),
    (
        "evaluate-out-bad-leaderboard",
        _eval(out=lambda w: w.p("taken/badresults")),
        lambda w: f"{w.p('taken/badresults/leaderboard.csv')}: not a UTF-8 text file",
    ),
    (
        "evaluate-out-under-a-file",
        _eval(out=lambda w: w.p("taken/file/results")),
        lambda w: f"--out {w.p('taken/file/results')}: {w.p('taken/file')} is a file",
    ),
    # --- leaderboard show / compare / plot -----------------------------------------------------
    (
        "show-png",
        lambda w, out: ["leaderboard", "show", w.p("files/plot.png")],
        lambda w: f"{w.p('files/plot.png')}: not a UTF-8 text file",
    ),
    (
        "show-latin1",
        lambda w, out: ["leaderboard", "show", w.p("files/latin1.csv")],
        lambda w: f"{w.p('files/latin1.csv')}: not a UTF-8 text file",
    ),
    (
        "show-wrong-schema",
        lambda w, out: ["leaderboard", "show", w.p("files/other.csv")],
        lambda w: f"{w.p('files/other.csv')}: not an emomerge leaderboard",
    ),
    (
        "show-missing",
        lambda w, out: ["leaderboard", "show", w.p("files/absent.csv")],
        lambda w: f"{w.p('files/absent.csv')}: no such file",
    ),
    (
        "show-folder",
        lambda w, out: ["leaderboard", "show", w.p("files")],
        lambda w: f"{w.p('files')}: no such file",
    ),
    (
        "show-by-unknown-column",
        lambda w, out: ["leaderboard", "show", w.leaderboard, "--by", "nope"],
        "--by: unknown column 'nope'",
    ),
    (
        "show-format-weird",
        lambda w, out: ["leaderboard", "show", w.leaderboard, "--format", "xlsx"],
        "--format: expected",
    ),
    (
        "show-by-book-png",
        lambda w, out: ["leaderboard", "show", w.p("files/plot.png"), "--by-book"],
        lambda w: f"{w.p('files/plot.png')}: not a UTF-8 text file",
    ),
    (
        "show-by-book-none-beside",
        lambda w, out: ["leaderboard", "show", w.leaderboard, "--by-book"],
        lambda w: f"{w.p('files/by_book.csv')}: no such file",
    ),
    (
        "compare-png",
        lambda w, out: ["leaderboard", "compare", w.leaderboard, w.p("files/plot.png")],
        lambda w: f"{w.p('files/plot.png')}: not a UTF-8 text file",
    ),
    (
        "compare-wrong-schema",
        lambda w, out: ["leaderboard", "compare", w.p("files/other.csv"), w.leaderboard],
        lambda w: f"{w.p('files/other.csv')}: not an emomerge leaderboard",
    ),
    (
        "plot-png-input",
        lambda w, out: [
            "leaderboard",
            "plot",
            w.p("files/plot.png"),
            "--out",
            out.with_suffix(".png"),
        ],
        lambda w: f"{w.p('files/plot.png')}: not a UTF-8 text file",
    ),
    (
        "plot-no-rows",
        lambda w, out: [
            "leaderboard",
            "plot",
            w.p("files/header-only.csv"),
            "--out",
            out.with_suffix(".png"),
        ],
        lambda w: f"{w.p('files/header-only.csv')}: no leaderboard rows",
    ),
    (
        "plot-out-is-a-folder",
        lambda w, out: ["leaderboard", "plot", w.leaderboard, "--out", w.p("taken/full.png")],
        None,
    ),
    (
        "plot-out-is-a-text-file",
        lambda w, out: ["leaderboard", "plot", w.leaderboard, "--out", w.p("files/notes.txt")],
        lambda w: f"--out {w.p('files/notes.txt')}: expected a .png, .pdf or .svg file name",
    ),
    ("plot-out-is-not-a-png", None, None),
    (
        "plot-out-is-the-leaderboard",
        lambda w, out: ["leaderboard", "plot", w.leaderboard, "--out", w.leaderboard],
        lambda w: f"--out {w.leaderboard}: expected a .png",
    ),
    # --- run, demo ------------------------------------------------------------------------------
    (
        "run-missing",
        lambda w, out: ["run", w.p("files/absent.yaml"), "--out", out],
        lambda w: f"{w.p('files/absent.yaml')}",
    ),
    (
        "run-latin1",
        lambda w, out: ["run", w.p("files/experiment-latin1.yaml"), "--out", out],
        lambda w: f"{w.p('files/experiment-latin1.yaml')}:",
    ),
    (
        "run-not-yaml",
        lambda w, out: ["run", w.p("files/experiment-not-yaml.yaml"), "--out", out],
        lambda w: f"{w.p('files/experiment-not-yaml.yaml')}:",
    ),
    (
        "run-unknown-key",
        lambda w, out: ["run", w.p("files/experiment-unknown-key.yaml"), "--out", out],
        lambda w: f"{w.p('files/experiment-unknown-key.yaml')}:",
    ),
    ("demo-unknown-option", lambda w, out: ["demo", "--fast"], "No such option: --fast"),
    (
        "demo-out-is-a-file",
        lambda w, out: ["demo", "--quick", "--out", w.p("taken/file")],
        lambda w: f"{w.p('taken/file')}/model: a file is in the way of a folder",
    ),
]


def _special(case: str):
    """Rows whose argv needs the row's own setup (kept out of the table for readability)."""
    return {
        "out-is-a-file": (
            lambda w, out: [
                "linear",
                "--adapters",
                w.s1,
                w.s2,
                "--out",
                w.p("taken/file"),
                "--force",
            ],
            lambda w: f"{w.p('taken/file')}",
        ),
        "out-not-empty": (
            lambda w, out: ["linear", "--adapters", w.s1, w.s2, "--out", w.p("taken/full")],
            lambda w: f"{w.p('taken/full')}",
        ),
        "out-is-an-input-force": (
            lambda w, out: ["linear", "--adapters", w.s1, w.s2, "--out", w.s2, "--force"],
            lambda w: f"{w.s2}",
        ),
        "out-is-a-stage-force": (
            lambda w, out: [
                "linear",
                "--adapters",
                w.s1,
                w.s2,
                "--out",
                w.p("taken/stage"),
                "--force",
            ],
            lambda w: f"{w.p('taken/stage')}",
        ),
        "out-locked": (
            lambda w, out: ["linear", "--adapters", w.s1, w.s2, "--out", out],
            lambda w: f"{w.out('out-locked')}",
        ),
        "plot-out-is-a-folder": (None, lambda w: f"--out {w.p('taken/full.png')}: is a folder"),
        "plot-out-is-not-a-png": (
            lambda w, out: ["leaderboard", "plot", w.leaderboard, "--out", w.p("taken/fake.png")],
            lambda w: f"--out {w.p('taken/fake.png')}: exists and is not a png plot",
        ),
    }.get(case)


def _rows():
    rows = []
    for case, argv, expect in ROWS:
        special = _special(case)
        if special is not None:
            argv = special[0] or argv
            expect = special[1]
        rows.append((case, argv, expect))
    return rows


TABLE = _rows()

#: Rows that still fail in code this module's owners do not own (reported; strict, so a fix
#: shows up as XPASS and the marker goes).
KNOWN_GAPS: dict[str, str] = {}


def _params():
    return [
        pytest.param(
            c,
            a,
            e,
            id=c,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[c])] if c in KNOWN_GAPS else [],
        )
        for c, a, e in TABLE
    ]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (files and folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def test_the_table_covers_every_command_and_at_least_60_rows(world):
    assert len(TABLE) >= 60
    assert len({c for c, _, _ in TABLE}) == len(TABLE)  # ids unique
    reached = {str(argv(world, world.out(c))[0]) for c, argv, _ in TABLE}
    reached |= {" ".join(map(str, argv(world, world.out(c))[:2])) for c, argv, _ in TABLE}
    assert {
        "ties",
        "linear",
        "task-arithmetic",
        "breadcrumbs",
        "della",
        "tsv",
        "dare-ties",
        "merge",
        "export-mergekit",
        "inspect",
        "methods",
        "train",
        "data synthetic",
        "data inspect",
        "evaluate",
        "leaderboard show",
        "leaderboard compare",
        "leaderboard plot",
        "run",
        "demo",
    } <= reached


@pytest.mark.parametrize("case,argv,expect", _params())
def test_bad_input(world, case, argv, expect):
    out = world.out(case)
    out.parent.mkdir(parents=True, exist_ok=True)
    if case == "plot-out-is-a-folder":
        (world.p("taken/full.png")).mkdir(exist_ok=True)

        def argv(w, o):
            return ["leaderboard", "plot", w.leaderboard, "--out", w.p("taken/full.png")]

    if case == "plot-out-is-not-a-png":
        world.p("taken/fake.png").write_text("not a picture\n")
    lock = None
    if case == "out-locked":
        from emomerge.merging import atomic

        lock = atomic.out_lock(out)
        lock.__enter__()
    before = snapshot(world.root)
    try:
        args = expand_variadic([str(a) for a in argv(world, out)])
        result = CliRunner().invoke(app, args)
        after = snapshot(world.root)
    finally:
        if lock is not None:  # the lock is the test's: released after the snapshot
            lock.__exit__(None, None, None)
    first = expect(world) if callable(expect) else expect
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {first}"), (first, result.stderr)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not out.exists() or case == "out-locked"
    if lock is None:
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_the_console_script_prints_the_same_one_line(world, tmp_path):
    """A real process (the installed entry point expands --adapters itself)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emomerge",
            "evaluate",
            "--base",
            str(world.base),
            "--data",
            str(world.emoart),
            "--dataset",
            "emoart",
            "--variants",
            str(world.s1),
            "--threshold",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --threshold: must be a number in [0, 1], got 2.0\n"
    assert proc.stdout == "" and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- generated inputs (hypothesis)
#
# The readers must load what they are given or raise InputError (one line at the CLI); any
# other exception is a traceback for the user. Inputs are drawn in and around each format.


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -1.0]),
)
_scalar = st.one_of(st.none(), st.booleans(), _number, _text)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(_text, inner, max_size=3),
        st.lists(st.fixed_dictionaries({"filter": _text, "value": inner}), max_size=2),
    ),
    max_leaves=6,
)
_param_key = st.one_of(
    st.sampled_from(
        [
            "weight",
            "density",
            "gamma",
            "epsilon",
            "lambda",
            "normalize",
            "rescale",
            "paper",
            "space",
            "fraction",
            "common_space_fraction",
        ]
    ),
    _text,
)
_params = st.dictionaries(_param_key, _value, max_size=4)
_model = st.one_of(
    st.fixed_dictionaries(
        {"model": st.one_of(_text, st.just("a"))}, optional={"parameters": _params}
    ),
    _value,
)
_recipe = st.fixed_dictionaries(
    {
        "merge_method": st.one_of(
            st.sampled_from(
                ["linear", "ties", "dare_ties", "breadcrumbs", "della", "tsv", "iso_c"]
            ),
            _value,
        )
    },
    optional={
        "models": st.one_of(st.lists(_model, max_size=3), _value),
        "parameters": st.one_of(_params, _value),
        "dtype": st.one_of(st.sampled_from(["float32", "bfloat16"]), _value),
        "base_model": _value,
        "emomerge": st.one_of(
            st.dictionaries(
                st.sampled_from(
                    ["rank", "max_error", "refactor", "output", "reference", "seed", "space", "x"]
                ),
                _value,
                max_size=3,
            ),
            _value,
        ),
        "tokenizer_source": _value,
    },
)


@SETTINGS
@given(doc=st.one_of(_recipe, _value), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_generated_recipes_load_or_raise_input_error(tmp_path, doc, raw):
    import yaml

    from emomerge.merging.recipe import Recipe, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_bytes(
        raw if raw is not None else yaml.safe_dump(doc, allow_unicode=True).encode("utf-8")
    )
    try:
        recipe = load_recipe(path)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    else:
        assert isinstance(recipe, Recipe)


def _csv_bytes(header: list[str], rows: list[list[str]], encoding: str) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue().encode(encoding, errors="replace")


_cell = st.one_of(
    _text,
    st.sampled_from(
        [
            '"',
            '""',
            "[",
            "['Joy']",
            "[Neutral]",
            "\n",
            "\x00",
            "1",
            "-1",
            "TRAIN",
            "TEST",
            "nan",
            "[1, 2]",
            "[\"['Anger', 'Joy']\"]",
            "['a', 'b']",
        ]
    ),
)
_encoding = st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"])


def _ec35_header():
    from emomerge.training.data.emocomics35 import COLUMNS

    return ["", *COLUMNS] if "" not in COLUMNS else list(COLUMNS)


@SETTINGS
@given(data=st.data(), encoding=_encoding)
def test_generated_emocomics35_csvs_load_or_raise_input_error(tmp_path, data, encoding):
    from emomerge.training.data import read_dataset

    header = _ec35_header()
    header = data.draw(
        st.one_of(
            st.just(header),
            st.permutations(header),
            st.lists(st.sampled_from(header + ["x"]), max_size=len(header)),
        )
    )
    rows = data.draw(
        st.lists(
            st.lists(_cell, min_size=max(0, len(header) - 1), max_size=len(header) + 1), max_size=4
        )
    )
    folder = tmp_path / "ec35"
    folder.mkdir(exist_ok=True)
    (folder / "emocomics35_pg_images_original.csv").write_bytes(_csv_bytes(header, rows, encoding))
    try:
        samples = read_dataset("emocomics35", folder, "train", None, allow_missing_images=True)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    else:
        assert all(s.labels for s in samples)


@SETTINGS
@given(data=st.data(), encoding=_encoding)
def test_generated_leaderboards_load_or_raise_input_error(tmp_path, data, encoding):
    from emomerge.evaluation import leaderboard as L

    header = data.draw(
        st.one_of(
            st.just(list(L.COLUMNS)),
            st.permutations(list(L.COLUMNS)),
            st.lists(st.sampled_from([*L.COLUMNS, "x", ""]), max_size=8),
        )
    )
    cells = st.one_of(_cell, _number.map(str))
    rows = data.draw(
        st.lists(
            st.lists(cells, min_size=max(0, len(header) - 2), max_size=len(header) + 1), max_size=4
        )
    )
    path = tmp_path / "leaderboard.csv"
    path.write_bytes(_csv_bytes(header, rows, encoding))
    try:
        rows_read = L.read_rows(path)
        shown = L.show(path, by="macro_f1")
        compared = L.compare(path, path, fmt="csv")
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    else:
        assert len(rows_read) == len(rows) and all(set(r) == set(L.COLUMNS) for r in rows_read)
        assert shown.startswith("| architecture |") and compared.startswith("architecture,")
