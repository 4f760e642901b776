"""The layers (docs/DESIGN.md, Layers): every module imports only its own layer or a lower one.

    0  merging (and the ``emomerge`` package itself: ``__version__`` only)
    1  training.models + training.data (+ the ``training``
       package, which every layer-1 import executes, so it may import nothing above layer 1)
    2  training (the rest: curriculum, stages, trainer, export) | evaluation — not each other
    3  experiment
    4  the CLI (emomerge/cli*.py, _cli_common.py, __main__.py)

Imports are read with ``ast`` from every module, including the ones inside functions (most
cross-package imports are deferred for start-up time, so an import-time check would miss them).
``merging`` imports neither transformers nor peft. Any ``emomerge.*`` import anywhere in the
repository must name a module that exists (a moved module leaves no stale deferred import).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: top-level folder → the package it is installed as (pyproject.toml, ``package-dir``)
FOLDERS = {
    "merging": "emomerge.merging",
    "training": "emomerge.training",
    "evaluation": "emomerge.evaluation",
    "experiment": "emomerge.experiment",
    "emomerge": "emomerge",
}
#: (module prefix, rank, group), most specific first; a prefix matches itself and its submodules
LAYERS = (
    ("emomerge.merging", 0, "merging"),
    ("emomerge.training.models", 1, "models+data"),
    ("emomerge.training.data", 1, "models+data"),
    ("emomerge.experiment", 3, "experiment"),
    ("emomerge.evaluation", 2, "evaluation"),
    ("emomerge.training", 2, "training"),
)
#: modules placed by exact name (package ``__init__``s that lower layers pass through)
EXACT = {"emomerge": (0, "merging"), "emomerge.training": (1, "models+data")}
CLI = (4, "cli")
#: third-party packages ``merging`` must not import (it works on tensors and safetensors only)
MERGING_FORBIDDEN = ("transformers", "peft")


def layer(module: str) -> tuple[int, str]:
    """(rank, group) of an ``emomerge`` module."""
    if module in EXACT:
        return EXACT[module]
    for prefix, rank, group in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank, group
    return CLI


def find_modules(root: Path) -> dict[str, Path]:
    """Every module of the five folders under ``root``, by its installed name."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


@dataclass(frozen=True)
class Import:
    target: str  # a dotted name: the module imported, or the package a name is taken from
    line: int


#: what an import above the top package resolves to (reported as a missing module)
ABOVE_TOP = "emomerge.<a relative import above the top package>"


def bound_names(init: Path) -> set[str]:
    """The names a package's ``__init__`` binds at its top level, its ``__all__`` and the keys
    of a lazy ``_EXPORTS`` table (served by a module ``__getattr__``)."""
    names: set[str] = set()
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                    if t.id in ("__all__", "_EXPORTS") and node.value is not None:
                        value = node.value
                        items = (
                            value.keys
                            if isinstance(value, ast.Dict)
                            else getattr(value, "elts", [])
                        )
                        names |= {k.value for k in items if isinstance(k, ast.Constant)}
    return names


def _dynamic_import(node: ast.Call) -> str | None:
    """``importlib.import_module("emomerge.x")`` / ``import_module(...)`` / ``__import__(...)``
    with a literal name: the module it imports."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if (
        isinstance(arg, ast.Constant)
        and isinstance(arg.value, str)
        and arg.value.startswith("emomerge")
    ):
        return arg.value
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file, at any depth (functions, classes, conditionals), resolved to
    absolute names. ``from P import x`` is ``P.x`` when that is a module, ``P`` when ``x`` is a
    name P's ``__init__`` binds, and the missing module ``P.x`` otherwise (a moved module left
    behind); literal ``importlib.import_module`` / ``__import__`` calls count as imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and (target := _dynamic_import(node)):
            out.append(Import(target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    out.append(Import(ABOVE_TOP, node.lineno))
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for a in node.names:
                full = f"{source}.{a.name}"
                if full in modules or source not in modules or a.name == "*":
                    out.append(Import(full if full in modules else source, node.lineno))
                elif modules[source].name == "__init__.py" and a.name not in bound_names(
                    modules[source]
                ):
                    out.append(Import(full, node.lineno))  # neither a module nor a name of P
                else:
                    out.append(Import(source, node.lineno))
    return out


def violations(root: Path) -> list[str]:
    """One line per import that breaks the layering, names a missing ``emomerge`` module, or
    brings transformers / peft into ``merging``."""
    modules = find_modules(root)
    known = set(modules)
    bad = []
    for module, path in modules.items():
        rank, group = layer(module)
        where = f"{path.relative_to(root)}:"
        for imp in imports_of(module, path, modules):
            top = imp.target.split(".")[0]
            if group == "merging" and top in MERGING_FORBIDDEN:
                bad.append(f"{where}{imp.line}: merging imports {imp.target}")
            if top != "emomerge":
                continue
            if imp.target not in known:
                bad.append(f"{where}{imp.line}: {imp.target} is no module")
                continue
            their_rank, their_group = layer(imp.target)
            if their_rank > rank or (their_rank == rank and their_group != group):
                bad.append(
                    f"{where}{imp.line}: {group} (layer {rank}) imports {imp.target} "
                    f"({their_group}, layer {their_rank})"
                )
    return bad


def test_every_module_imports_only_its_own_layer_or_a_lower_one():
    modules = find_modules(ROOT)
    assert {
        "emomerge.merging.engine",
        "emomerge.training.models.loading",
        "emomerge.training.trainer",
        "emomerge.evaluation.runner",
        "emomerge.experiment.run",
        "emomerge.cli",
    } <= set(modules)
    assert violations(ROOT) == []


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    """A small repository with one violation of each kind, deferred and relative ones included,
    beside modules that are allowed: exactly the violations are reported."""
    files = {
        "emomerge/__init__.py": "__version__ = '0'\n",
        "emomerge/cli.py": "from emomerge.experiment import run\n",
        "merging/__init__.py": "",
        "merging/core.py": "import torch\nfrom emomerge import __version__\n",
        "merging/bad.py": "def f():\n    import transformers\n"
        "    from emomerge.training.models import loading\n",
        "training/__init__.py": "",
        "training/stages.py": "from .models.loading import load\n",
        "training/models/__init__.py": "",
        "training/models/loading.py": "from emomerge.merging import core\n"
        "from ..data import read\n",
        "training/models/bad.py": "def g():\n    from ..stages import plan\n",
        "training/data/__init__.py": "from ..models import loading\n\n\ndef read(): ...\n",
        "evaluation/__init__.py": "_EXPORTS = {'EXPORTED': 'ok'}\ndef defined(): pass\n",
        "evaluation/ok.py": "from emomerge.training.data import read\n"
        "from emomerge.training.models.loading import load\n",
        "evaluation/bad.py": "def h():\n    from emomerge.training.stages import plan\n"
        "    import emomerge.experiment.run\n"
        "    import emomerge.evaluation.gone\n"
        "    importlib.import_module('emomerge.training.stages')\n"
        "    from emomerge.evaluation import plots\n"
        "    from emomerge.evaluation import ok, EXPORTED, defined\n"
        "    from .... import x\n",
        "evaluation/lazy.py": "def k():\n    __import__('emomerge.experiment.run')\n",
        "experiment/__init__.py": "",
        "experiment/run.py": "from emomerge.evaluation import ok\nfrom emomerge.training import "
        "stages\nfrom . import plots\n",
        "experiment/plots.py": "from emomerge.cli import app\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(violations(tmp_path)) == sorted(
        [
            "merging/bad.py:2: merging imports transformers",
            "merging/bad.py:3: merging (layer 0) imports emomerge.training.models.loading "
            "(models+data, layer 1)",
            "training/models/bad.py:2: models+data (layer 1) imports emomerge.training.stages "
            "(training, layer 2)",
            "evaluation/bad.py:2: evaluation (layer 2) imports emomerge.training.stages "
            "(training, layer 2)",
            "evaluation/bad.py:3: evaluation (layer 2) imports emomerge.experiment.run "
            "(experiment, layer 3)",
            "evaluation/bad.py:4: emomerge.evaluation.gone is no module",
            "evaluation/bad.py:5: evaluation (layer 2) imports emomerge.training.stages "
            "(training, layer 2)",
            "evaluation/bad.py:6: emomerge.evaluation.plots is no module",
            f"evaluation/bad.py:8: {ABOVE_TOP} is no module",
            "evaluation/lazy.py:2: evaluation (layer 2) imports emomerge.experiment.run "
            "(experiment, layer 3)",
            "experiment/plots.py:1: experiment (layer 3) imports emomerge.cli (cli, layer 4)",
        ]
    )


def test_the_folders_are_the_installed_packages():
    """FOLDERS is pyproject.toml's package-dir, so the checker reads every installed module."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {pkg: folder for folder, pkg in FOLDERS.items()} == setup["package-dir"]
    found = {m for m, p in find_modules(ROOT).items() if p.name == "__init__.py"}
    assert found == set(setup["packages"])


def test_no_stale_emomerge_import_in_tests_benchmarks_or_tools():
    """Outside the packages too, every ``emomerge.*`` import names a module that exists."""
    modules = find_modules(ROOT)
    known = set(modules)
    stale = []
    for folder in ("tests", "benchmarks", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for imp in imports_of("tests.x", path, modules):
                if imp.target.split(".")[0] == "emomerge" and imp.target not in known:
                    stale.append(f"{path.relative_to(ROOT)}:{imp.line}: {imp.target}")
    assert stale == []


def test_the_shared_layer_loads_without_the_trainer():
    """Evaluation's entry points and the model/data layer load no trainer, stages or curriculum
    (``training/__init__.py`` imports nothing)."""
    code = (
        "import sys\n"
        "import emomerge.evaluation.pipeline, emomerge.evaluation.runner\n"
        "import emomerge.training.models.tiny, emomerge.training.models.loading\n"
        "import emomerge.training.data.synthetic\n"
        "print(sorted(m for m in sys.modules if m.startswith('emomerge.training.')\n"
        "             and not m.startswith(('emomerge.training.models',\n"
        "                                   'emomerge.training.data'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split("\n")[0] == "[]"
