"""The one base fingerprint (DESIGN.md, Layers): content, never the path or the config alone."""

from __future__ import annotations

import hashlib
import json
import shutil

import torch
from safetensors.torch import save_file

from emomerge.merging.checkpoint import Checkpoint
from emomerge.training.models.fingerprint import fingerprint


def _checkpoint(folder, weight: torch.Tensor):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    save_file({"model.w": weight}, str(folder / "model.safetensors"))
    return folder


def test_a_local_checkpoint_is_fingerprinted_by_content(tmp_path):
    a = _checkpoint(tmp_path / "a", torch.arange(12.0).reshape(3, 4))
    fp = fingerprint(a)
    # the merging core's fingerprint, recomputed here from its own definition's inputs
    assert fp == Checkpoint(a).fingerprint() and len(fp) == 64
    assert fp != hashlib.sha256(str(a).encode()).hexdigest()
    assert fp != hashlib.sha256((a / "config.json").read_bytes()).hexdigest()
    # a copy elsewhere is the same base; other weights of the same shapes are not
    assert fingerprint(shutil.copytree(a, tmp_path / "copy")) == fp
    other = _checkpoint(tmp_path / "b", torch.arange(12.0).reshape(3, 4) + 1)
    assert fingerprint(other) != fp
    assert fingerprint(str(a)) == fp  # a str and a Path name the same folder


def test_no_content_fingerprint_is_none(tmp_path):
    """A hub id, a missing folder and a folder without safetensors weights have none: the
    callers then go by the name (the config alone would make two fine-tunes one base)."""
    assert fingerprint("Qwen/Qwen2.5-VL-7B-Instruct") is None
    assert fingerprint(tmp_path / "nowhere") is None
    bare = tmp_path / "bin-only"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert fingerprint(bare) is None
    broken = _checkpoint(tmp_path / "broken", torch.zeros(2))
    (broken / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{")  # truncated header
    assert fingerprint(broken) is None
