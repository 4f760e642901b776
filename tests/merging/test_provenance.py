"""Provenance (merging/provenance.py): versions as installed, git_dirty of a checkout, and the
``software`` record of merge manifests (DESIGN.md, Outputs)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from emomerge.merging import merge, provenance

from .helpers import lm_modules, write_adapter

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_versions_are_the_installed_distributions():
    found = provenance.software()
    assert found["python"] == platform.python_version()
    for name in ("torch", "transformers", "peft", "safetensors", "emomerge"):
        assert found[name] == metadata.version(name), name
    assert found["git_dirty"] in (True, False, None)
    text = provenance.versions_text(found)
    assert text.split() == [
        f"{k}={found[k]}"
        for k in ("python", "torch", "transformers", "peft", "safetensors", "emomerge")
    ]
    assert "git_dirty" not in text
    # a package that is not installed is None in the record and left out of the text
    assert provenance.versions_text({"torch": "2.0", "peft": None}) == "torch=2.0"


def test_merging_reads_versions_without_importing_transformers_or_peft():
    code = (
        "import sys; from emomerge.merging import provenance; provenance.software(); "
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _git(root, *args):
    subprocess.run(
        ["git", "-C", str(root), *args],
        check=True,
        capture_output=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
            "HOME": str(root),
            "PATH": "/usr/bin:/bin:/usr/local/bin",
        },
    )


@needs_git
def test_git_dirty_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "first")
    assert provenance.git_dirty(repo) is False
    assert len(provenance.git_commit(repo)) == 12
    (repo / "a.py").write_text("x = 2\n")  # an edited file
    assert provenance.git_dirty(repo) is True
    _git(repo, "checkout", "-q", "--", "a.py")
    assert provenance.git_dirty(repo) is False
    (repo / "new.py").touch()  # a new file, not ignored
    assert provenance.git_dirty(repo) is True
    (repo / ".gitignore").write_text("new.py\n.gitignore\n")
    assert provenance.git_dirty(repo) is False
    # a folder inside the checkout is not the top of one: None, not the enclosing repo's state
    (repo / "pkg").mkdir()
    assert provenance.git_dirty(repo / "pkg") is None


def test_git_dirty_is_none_outside_git_or_without_git(tmp_path, monkeypatch):
    assert provenance.git_dirty(tmp_path) is None
    assert provenance.git_dirty(tmp_path / "missing") is None
    assert provenance.git_commit(tmp_path) == ""
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert provenance.git_dirty(provenance.SOURCE_ROOT) is None


def test_merge_manifest_records_the_software(tmp_path):
    shapes = lm_modules(layers=1, hidden=8, inter=12)
    write_adapter(tmp_path / "a", shapes, seed=1)
    write_adapter(tmp_path / "b", shapes, seed=2)
    merge("linear", [tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "emomerge.json").read_text())
    assert manifest["software"]["torch"] == metadata.version("torch")
    assert manifest["software"]["safetensors"] == metadata.version("safetensors")
    assert manifest["software"]["git_dirty"] == provenance.git_dirty()
