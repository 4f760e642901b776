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


def test_what_a_stage_records_keeps_old_runs_resumable(tmp_path):
    """A stage records the fingerprint; for a folder without safetensors the config's sha256,
    as earlier releases did (a resume compares it); a hub id records nothing."""
    from emomerge.training.models.fingerprint import recorded_base_hash

    a = _checkpoint(tmp_path / "a", torch.arange(6.0))
    assert recorded_base_hash(a) == fingerprint(a)
    bare = tmp_path / "bin-only"
    bare.mkdir()
    (bare / "config.json").write_text('{"model_type": "llava"}')
    (bare / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert recorded_base_hash(bare) == hashlib.sha256(b'{"model_type": "llava"}').hexdigest()
    assert recorded_base_hash("llava-hf/llava-1.5-7b-hf") is None


def test_evaluation_takes_a_config_hash_only_for_a_base_without_content(tmp_path):
    """Two checkpoints of one architecture share a config: a stage recorded with the config's
    hash matches a base only when that base has no content fingerprint."""
    from emomerge.evaluation.pipeline import LoadedBase

    a = _checkpoint(tmp_path / "a", torch.arange(6.0))
    config_hash = hashlib.sha256((a / "config.json").read_bytes()).hexdigest()
    assert LoadedBase.of(a).hashes == {fingerprint(a)}
    bare = tmp_path / "bin-only"
    bare.mkdir()
    shutil.copy(a / "config.json", bare / "config.json")
    assert LoadedBase.of(bare).hashes == {config_hash}
