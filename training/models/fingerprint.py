"""The base model's identity: one content fingerprint for training, merging and evaluation."""

from __future__ import annotations

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
