"""The base model's identity: one content fingerprint for training, merging and evaluation."""

from __future__ import annotations

import hashlib
from pathlib import Path

from emomerge.merging.errors import InputError


def fingerprint(name_or_path: str | Path) -> str | None:
    """The content fingerprint of a local base (``merging.checkpoint.Checkpoint.fingerprint``:
    config, tokenizer files, safetensors headers and data samples), or None when there is none.

    None for a hub id (no local ``config.json``) and for a local folder whose safetensors weights
    cannot be read (none there, or a broken index or header): only content identifies a base,
    so a folder is never fingerprinted by its path or by its config alone — two checkpoints of
    one architecture share a config, and a config hash would pair or cache them as one model.
    Where a key is needed anyway the caller uses the name (evaluation's prediction cache), and
    a stage recorded with no hash is matched to a base by name, as a hub id is (DESIGN.md,
    Layers: training records this as ``base.hash``; evaluation pairs rows and keys caches on it).
    """
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        return None
    from emomerge.merging.checkpoint import Checkpoint

    try:
        return Checkpoint(path).fingerprint()
    except InputError:
        return None


def recorded_base_hash(name_or_path: str | Path) -> str | None:
    """What a stage records as its ``base.hash`` (and the experiment runner keys chains on):
    :func:`fingerprint`, or — for a local folder whose safetensors cannot be read (``.bin``
    weights, a broken index) — the sha256 of its ``config.json``, as every earlier release
    recorded it, so runs on such a base still resume instead of retraining. Evaluation accepts
    that config hash only for a base with no content fingerprint (evaluation/pipeline.py)."""
    found = fingerprint(name_or_path)
    config = Path(name_or_path) / "config.json"
    if found is None and config.is_file():
        return hashlib.sha256(config.read_bytes()).hexdigest()
    return found
