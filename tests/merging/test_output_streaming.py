"""Streamed safetensors output: the writer against ``save_file``, raw copies, sharded merges."""

from __future__ import annotations

import errno
import gc
import itertools
import json
import os
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emomerge.merging import merge
from emomerge.merging import output as O
from emomerge.merging.checkpoint import Checkpoint
from emomerge.merging.errors import MergeInputError

from . import tiny_models as T
from .helpers import lm_modules, write_adapter

ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1, "BOOL": 1}


@pytest.fixture(autouse=True, params=["direct", "buffered"])
def write_mode(request, monkeypatch):
    """Every test here runs with O_DIRECT data writes (through a bounce buffer made small, so
    files span many flushes and end in a padded block) and with ordinary buffered writes."""
    if request.param == "direct" and not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(O, "_DIRECT_IO", request.param == "direct")
    monkeypatch.setattr(O, "_BOUNCE", 3 * O._ALIGN)
    return request.param


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 7, generator=g),
        "w.bf16": torch.randn(3, 5, generator=g).bfloat16(),  # 30 bytes: unaligns what follows
        "w.f16": torch.randn(11, generator=g).half(),
        "w.f64": torch.randn(2, 3, generator=g).double(),
        "ids.i64": torch.randint(-(1 << 40), 1 << 40, (9,), generator=g),
        "ids.i32": torch.randint(-1000, 1000, (2, 2, 3), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "mask.bool": torch.rand(17, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty.i64": torch.zeros(3, 0, dtype=torch.int64),
        "transposed": torch.randn(4, 6, generator=g).T,  # not contiguous
        "slice": torch.randn(10, 10, generator=g)[2:5, 1:4],  # a view into a larger storage
        "nonascii.é": torch.randn(2, generator=g),
    }


def header(path) -> tuple[int, bytes, dict]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
    return n, raw, json.loads(raw)


def tensor_bytes(path, key: str) -> bytes:
    n, _, head = header(path)
    begin, end = head[key]["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(8 + n + begin)
        return fh.read(end - begin)


def write_streamed(path, tensors, ndims=None) -> None:
    ndims = {k: t.dim() for k, t in tensors.items()} if ndims is None else ndims
    with O.SafetensorsWriter(path, ndims, {"format": "pt"}) as writer:
        for key, t in tensors.items():
            writer.add(key, t)


def assert_well_formed(path) -> dict:
    """The format's own rules: aligned data start, space padding, a data buffer without holes."""
    n, raw, head = header(path)
    assert n % 8 == 0
    text = raw.decode()
    assert text.rstrip(" ") == text.rstrip() and json.loads(text.rstrip(" ")) == head
    spans = sorted(e["data_offsets"] for k, e in head.items() if k != "__metadata__")
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert not spans or spans[0][0] == 0
    assert os.path.getsize(path) == 8 + n + (spans[-1][1] if spans else 0)
    return head


def test_streamed_file_equals_save_file(tmp_path):
    tensors = mixed_tensors()
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    write_streamed(ours, tensors)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(ref), metadata={"format": "pt"})
    head = assert_well_formed(ours)
    _, _, ref_head = header(ref)
    assert next(iter(head)) == "__metadata__"
    for key in tensors:
        assert head[key]["dtype"] == ref_head[key]["dtype"]
        assert head[key]["shape"] == ref_head[key]["shape"]
        assert tensor_bytes(ours, key) == tensor_bytes(ref, key)
    got, want = load_file(str(ours)), load_file(str(ref))
    assert set(got) == set(want) == set(tensors)
    for key, t in tensors.items():
        assert got[key].dtype == want[key].dtype == t.dtype and got[key].shape == t.shape
        assert torch.equal(got[key], want[key]) and torch.equal(got[key], t)
    with safe_open(ours, "pt") as f, safe_open(ref, "pt") as r:
        assert f.metadata() == r.metadata() == {"format": "pt"}
        assert list(f.keys()) == list(r.keys())
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), r.get_tensor(key))
            assert f.get_slice(key).get_shape() == list(tensors[key].shape)


def test_reserved_header_padding_is_read_by_safetensors(tmp_path):
    """Announced keys that are never written leave a long space-padded header: still valid."""
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([True, False, True])}
    ndims = {"a": 2, "b": 1} | {f"never.written.{i}": 4 for i in range(50)}
    write_streamed(tmp_path / "f.safetensors", tensors, ndims)
    n, raw, _ = header(tmp_path / "f.safetensors")
    assert n > 50 * 100 and raw.endswith(b" " * 1000)  # the unused reservation is padding
    assert_well_formed(tmp_path / "f.safetensors")
    got = load_file(str(tmp_path / "f.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_empty_file_is_valid(tmp_path):
    write_streamed(tmp_path / "f.safetensors", {})
    assert load_file(str(tmp_path / "f.safetensors")) == {}
    with safe_open(tmp_path / "f.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("ndims", [{}, {"a": 1}], ids=["unannounced", "too-few-dims"])
def test_header_that_outgrows_its_reservation_is_rewritten(tmp_path, ndims):
    tensors = {"a": torch.randn(2, 3, 4, 5, 6), "b" * 300: torch.randn(7)}
    write_streamed(tmp_path / "f.safetensors", tensors, ndims)
    assert_well_formed(tmp_path / "f.safetensors")
    got = load_file(str(tmp_path / "f.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "f.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert os.listdir(tmp_path) == ["f.safetensors"]


def test_writer_keeps_no_tensor(tmp_path):
    with O.SafetensorsWriter(tmp_path / "f.safetensors", {"a": 2, "b": 2}) as writer:
        for key in ("a", "b"):
            t = torch.randn(64, 64)
            ref = weakref.ref(t)
            writer.add(key, t.T)  # a view: even its base must not be kept
            del t
            gc.collect()
            assert ref() is None
        kept = [v for entry in writer.entries.values() for v in entry.values()]
        assert not any(isinstance(v, torch.Tensor) for v in kept)


def test_writer_refuses_a_key_twice(tmp_path):
    writer = O.SafetensorsWriter(tmp_path / "f.safetensors", {"a": 1})
    with pytest.raises(ValueError, match="twice"), writer:
        writer.add("a", torch.ones(2))
        writer.add("a", torch.ones(2))


# -- raw copies from a base checkpoint -------------------------------------------------------
@pytest.fixture()
def mixed_base(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    tensors = mixed_tensors()
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder, tensors


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "refused", "missing"])
def test_raw_copy_is_byte_identical(mixed_base, tmp_path, monkeypatch, kernel_copy):
    folder, tensors = mixed_base
    if kernel_copy == "refused":

        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(O.os, "copy_file_range", refuse, raising=False)
    elif kernel_copy == "missing":
        monkeypatch.delattr(O.os, "copy_file_range", raising=False)
    monkeypatch.setattr(O, "_COPY_CHUNK", 7)  # many short reads in the buffered path
    ckpt, src = Checkpoint(folder), folder / "model.safetensors"
    with O.SafetensorsWriter(
        tmp_path / "out.safetensors", {k: t.dim() for k, t in tensors.items()}, {"format": "pt"}
    ) as writer:
        for i, key in enumerate(tensors):
            if i % 3 == 0:  # interleaved with streamed tensors
                writer.add(key, tensors[key])
            else:
                writer.copy(key, ckpt.stored(key))
    assert_well_formed(tmp_path / "out.safetensors")
    for key in tensors:
        assert tensor_bytes(tmp_path / "out.safetensors", key) == tensor_bytes(src, key)
    got = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_stored_locates_tensors(mixed_base):
    folder, tensors = mixed_base
    ckpt = Checkpoint(folder)
    for key, t in tensors.items():
        s = ckpt.stored(key)
        assert s.file == folder / "model.safetensors" and s.shape == tuple(t.shape)
        assert s.length == t.numel() * t.element_size()
        with open(s.file, "rb") as fh:
            fh.seek(s.offset)
            assert fh.read(s.length) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_truncated_base_is_named(mixed_base):
    """A sharded base is opened lazily: a cut shard is found when its header is read."""
    folder, tensors = mixed_base
    path = folder / "model.safetensors"
    index = {"weight_map": dict.fromkeys(tensors, path.name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.truncate(path, path.stat().st_size - 3)
    ckpt = Checkpoint(folder)
    with pytest.raises(MergeInputError, match="model.safetensors.*truncated"):
        ckpt.stored("w.f32")


# -- full-output merges, sharded ---------------------------------------------------------------
def check_sharded(out, base: dict[str, torch.Tensor], base_folder, merged: set[str]) -> dict:
    """Every base tensor once, in well-formed shards the index lists; untouched ones byte-equal."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(index["weight_map"]) == sorted(base)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in base.values())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    state = {}
    src = Checkpoint(base_folder)
    for file in files:
        head = assert_well_formed(out / file)
        data_start = 8 + header(out / file)[0]
        with safe_open(out / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {index["weight_map"][k] for k in f.keys()} == {file}
            for key in f.keys():
                state[key] = f.get_tensor(key)
                # written widest dtype first: each tensor aligned to its element size
                begin = data_start + head[key]["data_offsets"][0]
                assert begin % ITEMSIZE[head[key]["dtype"]] == 0, key
                if key not in merged:
                    assert tensor_bytes(out / file, key) == tensor_bytes(src.stored(key).file, key)
    assert sorted(state) == sorted(base)
    return state


def test_sharded_full_output_of_a_mixed_dtype_base(tmp_path):
    shapes = lm_modules(layers=2, hidden=16, inter=24)
    d1 = write_adapter(tmp_path / "a", shapes, seed=1)
    d2 = write_adapter(tmp_path / "b", shapes, seed=2, r=3)
    g = torch.Generator().manual_seed(5)
    base = {f"{p}.weight": torch.randn(*s, generator=g).bfloat16() for p, s in shapes.items()}
    v_proj = "model.layers.0.self_attn.v_proj.weight"
    base[v_proj] = base[v_proj].float()
    base |= {k: t.contiguous() for k, t in mixed_tensors().items()}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')

    merge(
        "linear",
        [tmp_path / "a", tmp_path / "b"],
        tmp_path / "full",
        weights=[0.25, 0.75],
        output="full",
        base=tmp_path / "base",
        max_shard_size=700,
    )
    merged = {f"{p}.weight" for p in shapes}
    state = check_sharded(tmp_path / "full", base, tmp_path / "base", merged)
    for key, t in base.items():
        assert state[key].dtype == t.dtype and state[key].shape == t.shape, key
        if key in merged:
            path = key[: -len(".weight")]
            expect = (t.double() + (d1[path] + 3 * d2[path]) / 4).to(t.dtype)
            torch.testing.assert_close(
                state[key].double(), expect.double(), rtol=2**-7, atol=1e-6
            )  # one bf16 ulp
        else:
            assert torch.equal(state[key], t), key


def test_sharded_full_output_of_a_real_model(tmp_path_factory, tmp_path):
    """A tiny Qwen2.5-VL in several shards: loads in transformers; merged = base + Σ c ΔW."""
    qwen = T.tiny_family(tmp_path_factory, "qwen2_5_vl")
    w = [0.5, 0.3, 0.8]
    merge(
        "task_arithmetic",
        qwen.adapters,
        tmp_path / "full",
        weights=w,
        params={"lambda": 0.7},
        output="full",
        base=qwen.base,
        max_shard_size=150_000,
    )
    base = T.load_state(qwen.base)
    deltas = [T.dense_updates(a) for a in qwen.adapters]
    merged = {qwen.base_key(p): p for p in deltas[0]}
    state = check_sharded(tmp_path / "full", base, qwen.base, set(merged))
    for key, t in base.items():
        if key in merged:
            expect = t.double() + sum(0.7 * wi * d[merged[key]] for wi, d in zip(w, deltas))
            torch.testing.assert_close(state[key].double(), expect, rtol=0, atol=1e-6)
        else:
            assert torch.equal(state[key], t), key
    model = T.load_model("qwen2_5_vl", tmp_path / "full")
    assert torch.equal(model.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_direct_mode_is_used_and_falls_back_when_a_write_is_refused(
    tmp_path, monkeypatch, write_mode
):
    if write_mode != "direct":
        pytest.skip("direct mode only")
    with O.SafetensorsWriter(tmp_path / "probe.safetensors", {}) as writer:
        if writer.direct is None:
            pytest.skip("this file system refuses O_DIRECT")
    real, refused = O.os.pwrite, []

    def pwrite(fd, data, offset):
        if not refused:  # the first direct write: refused as tmpfs or a network mount would
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(O.os, "pwrite", pwrite)
    tensors = mixed_tensors()
    write_streamed(tmp_path / "f.safetensors", tensors)
    assert refused and assert_well_formed(tmp_path / "f.safetensors")
    got = load_file(str(tmp_path / "f.safetensors"))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_direct_io_can_be_switched_off(tmp_path, monkeypatch, write_mode):
    monkeypatch.setenv("EMOMERGE_DIRECT_IO", "0")
    with O.SafetensorsWriter(tmp_path / "f.safetensors", {"a": 1}) as writer:
        writer.add("a", torch.arange(5.0))
        assert writer.direct is None
    assert torch.equal(load_file(str(tmp_path / "f.safetensors"))["a"], torch.arange(5.0))
