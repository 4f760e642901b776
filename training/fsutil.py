"""Small filesystem helpers for folders that appear atomically."""

from __future__ import annotations

import os
from pathlib import Path


def publish_permissions(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (0700) and its files the modes the user's umask would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
