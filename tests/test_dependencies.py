"""pyproject's dependencies are exactly what the code imports.

Every .py file of merging/, training/, evaluation/, experiment/ and emomerge/ is parsed with
``ast``; the top-level modules imported that are neither stdlib (``sys.stdlib_module_names``) nor
our own package are mapped to their distributions
(``importlib.metadata.packages_distributions``) and must equal ``[project].dependencies``. An
import inside a ``try`` that catches ImportError is optional (a fallback, or an extra such as
bitsandbytes) and not required.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("merging", "training", "evaluation", "experiment", "emomerge")
OWN = {"emomerge"}
#: declared but never imported by our code, each for a reason that holds at run time
RUNTIME_ONLY = {
    "torchvision": "transformers' Qwen2/2.5-VL image and video processors import it (docs/DESIGN.md, Facts)",
}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _guards_import(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in names)


def imported_modules(folders) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(required, optional)``: top-level third-party module → files importing it; optional
    ones are only ever imported inside a ``try`` whose handlers catch ImportError."""
    required: dict[str, set[str]] = {}
    optional: dict[str, set[str]] = {}

    def visit(node: ast.AST, guarded: bool, file: str) -> None:
        if isinstance(node, ast.Try):
            catches = any(_guards_import(h) for h in node.handlers if h.type is not None)
            for child in node.body:
                visit(child, guarded or catches, file)
            for handler in node.handlers:
                for child in handler.body:
                    visit(child, guarded or catches, file)
            for child in node.orelse + node.finalbody:
                visit(child, guarded, file)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in OWN:
                (optional if guarded else required).setdefault(top, set()).add(file)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, file)

    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, str(path))
    for top in required:
        optional.pop(top, None)
    return required, optional


def distributions(modules) -> dict[str, str]:
    """Import name → normalised distribution name (fails naming a module nobody provides)."""
    known = importlib.metadata.packages_distributions()
    out = {}
    for top in modules:
        dists = known.get(top)
        assert dists, f"import '{top}' is provided by no installed distribution"
        out[top] = normalise(dists[0])
    return out


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """``(dependencies, extras)`` names, normalised."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]

    def name(req):
        return normalise(re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0))

    deps = {name(r) for r in project.get("dependencies", [])}
    extras = {name(r) for group in project.get("optional-dependencies", {}).values() for r in group}
    return deps, extras


def mismatch(folders, pyproject: Path) -> dict[str, list[str]]:
    required, optional = imported_modules(folders)
    needed = distributions(required)
    deps, extras = declared(pyproject)
    want = set(needed.values()) | set(RUNTIME_ONLY)
    return {
        "imported but not declared": sorted(
            f"{d} ({', '.join(sorted(required[m]))})" for m, d in needed.items() if d not in deps
        ),
        "declared but not imported": sorted(deps - want),
        "optional import of an undeclared package": sorted(
            f"{d} ({', '.join(sorted(optional[m]))})"
            for m, d in distributions(
                [m for m in optional if m in importlib.metadata.packages_distributions()]
            ).items()
            if d not in deps | extras and d not in _FALLBACKS
        ),
    }


#: guarded fallbacks for older versions of a declared dependency (typer < 0.22 used click)
_FALLBACKS = {"click"}


def test_dependencies_are_exactly_the_imports(monkeypatch):
    monkeypatch.chdir(ROOT)
    problems = {k: v for k, v in mismatch(FOLDERS, ROOT / "pyproject.toml").items() if v}
    assert not problems, problems


def test_runtime_only_entries_are_really_not_imported(monkeypatch):
    monkeypatch.chdir(ROOT)
    required, _ = imported_modules(FOLDERS)
    assert not set(distributions(required).values()) & set(RUNTIME_ONLY)


def test_an_undeclared_import_is_caught(tmp_path):
    """The check fails on a module importing something pyproject does not list, and on a
    declared package nobody imports; a guarded import stays optional."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "import os\nimport numpy as np\n\ndef f():\n    import scipy.stats\n"
        "    try:\n        import bitsandbytes\n    except ImportError:\n        pass\n"
    )
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1", "torchvision", "PyYAML"]\n'
        '[project.optional-dependencies]\ngpu = ["bitsandbytes"]\n'
    )
    got = mismatch([pkg], pyproject)
    assert got["imported but not declared"] == [f"scipy ({pkg / 'a.py'})"]
    assert got["declared but not imported"] == ["pyyaml"]
    assert got["optional import of an undeclared package"] == []
