"""What software produced an output: package versions and whether the source tree was edited.

A merge manifest, a training stage's ``emomerge.json`` and every leaderboard row record
:func:`software` (DESIGN.md, Outputs): a number that moves between two runs can then be traced
to a torch / transformers upgrade or to uncommitted edits of emomerge itself (``git_dirty``),
which ``emomerge_version`` and ``git_hash`` alone do not show.

Versions are read with :mod:`importlib.metadata` (the installed distributions), never by
importing the packages: the merging layer imports no transformers or peft (DESIGN.md, Layers).
Everything here is fast and never raises: provenance must not be why an output is not written.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

#: The distributions whose versions are recorded, in this order.
PACKAGES = ("torch", "transformers", "peft", "safetensors", "emomerge")
#: The emomerge source tree: the folder holding ``merging/`` (the checkout, when editable).
SOURCE_ROOT = Path(__file__).resolve().parent.parent
_GIT_TIMEOUT = 5.0


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a broken dist-info is no reason to fail an output
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """``{"python": …, "torch": …, …}``; ``None`` for a package that is not installed."""
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}


def versions_text(found: dict[str, Any] | None = None) -> str:
    """The compact one-cell form: ``"python=3.11.7 torch=2.4.1 transformers=4.46.0 …"``
    (packages not installed are left out)."""
    found = versions() if found is None else found
    return " ".join(f"{k}={v}" for k, v in found.items() if k != "git_dirty" and v)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # status takes no index lock
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
            env=env,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _toplevel(root: Path) -> Path | None:
    """``root`` when it is the top of a git checkout (not a folder inside someone else's repo,
    e.g. a virtualenv's site-packages inside a project), else None."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0 or not top.stdout.strip():
        return None
    try:
        same = Path(top.stdout.strip()).resolve() == root.resolve()
    except OSError:
        return None
    return root if same else None


def git_dirty(root: str | Path | None = None) -> bool | None:
    """True when the git checkout at ``root`` (default: emomerge's source tree) has changes —
    edited, staged or new files not ignored — False when clean, None when it is not the top of
    a git checkout or git is missing or fails."""
    root = SOURCE_ROOT if root is None else Path(root)
    if not root.is_dir() or _toplevel(root) is None:
        return None
    status = _git(root, "status", "--porcelain")
    if status is None or status.returncode != 0:
        return None
    return bool(status.stdout.strip())


def git_commit(root: str | Path | None = None) -> str:
    """The short (12) commit hash of the checkout at ``root``; empty when there is none."""
    root = SOURCE_ROOT if root is None else Path(root)
    if not root.is_dir() or _toplevel(root) is None:
        return ""
    head = _git(root, "rev-parse", "--short=12", "HEAD")
    return head.stdout.strip() if head is not None and head.returncode == 0 else ""


def software() -> dict[str, Any]:
    """The ``software`` record of a manifest: :func:`versions` plus ``git_dirty``."""
    return {**versions(), "git_dirty": git_dirty()}
