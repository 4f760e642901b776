"""Tensors are read with pread (no memory map), into fresh memory or a reused buffer; the bytes
must be exactly what safetensors' own loader gives."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from emomerge.merging.checkpoint import Checkpoint, read_header, read_stored, stored_entry
from emomerge.merging.errors import MergeInputError


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.mask": torch.rand(6, generator=g) > 0.5,
        "d.empty": torch.zeros(0, 3),
        "e.ids": torch.arange(11, dtype=torch.int64),
        "f.half": torch.randn(2, 2, 2, generator=g).half(),
    }


def test_read_stored_matches_safetensors(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    data_start, header = read_header(path)
    buffer = torch.empty(1024, dtype=torch.uint8)
    for key, ref in reference.items():
        for buf in (None, buffer):
            got = read_stored(stored_entry(path, data_start, header, key), buf)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got, ref), key
    # through the checkpoint, too (its own index of a single file)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.tensor("b.weight"), reference["b.weight"])


def test_a_buffer_too_small_is_not_used(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    data_start, header = read_header(path)
    small = torch.zeros(4, dtype=torch.uint8)
    got = read_stored(stored_entry(path, data_start, header, "a.weight"), small)
    assert torch.equal(got, tensors["a.weight"]) and torch.equal(
        small, torch.zeros(4, dtype=torch.uint8)
    )


def test_truncated_and_unknown_are_clear_errors(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(MergeInputError, match="truncated"):
        read_header(path)
    path.write_bytes(data)
    data_start, header = read_header(path)
    with pytest.raises(MergeInputError, match="no tensor 'zz'"):
        stored_entry(path, data_start, header, "zz")
