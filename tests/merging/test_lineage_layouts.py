"""Task vectors from lineage (continued / stacked, reference base / previous) and key layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging import build_task_vectors, merge
from emomerge.merging.errors import MergeInputError

from .helpers import lm_modules, write_adapter, write_base

SHAPES = lm_modules(layers=1, hidden=8, inter=12)


def chain(root, mode):
    d1 = write_adapter(root / "s1", SHAPES, seed=1, lineage={"mode": None, "parent": None})
    d2 = write_adapter(root / "s2", SHAPES, seed=2, lineage={"mode": mode, "parent": "../s1"})
    d3 = write_adapter(root / "s3", SHAPES, seed=3, lineage={"mode": mode, "parent": "../s2"})
    return d1, d2, d3


@pytest.mark.parametrize(
    "mode,reference",
    [
        ("continued", "base"),
        ("continued", "previous"),
        ("stacked", "base"),
        ("stacked", "previous"),
    ],
)
def test_task_vectors_follow_lineage(tmp_path, mode, reference):
    d1, d2, d3 = chain(tmp_path, mode)
    tv = build_task_vectors(
        [tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"], reference=reference
    )
    # The model after stage k, written out from the definitions of the two modes.
    if mode == "stacked":
        model = [d1, {p: d1[p] + d2[p] for p in SHAPES}, {p: d1[p] + d2[p] + d3[p] for p in SHAPES}]
    else:
        model = [d1, d2, d3]
    for i in range(3):
        for path in SHAPES:
            expect = model[i][path] - (model[i - 1][path] if reference == "previous" and i else 0)
            np.testing.assert_allclose(tv.dense(i, path, torch.float64).numpy(), expect, atol=1e-12)


def test_stacked_stage_alone_pulls_in_its_ancestors(tmp_path):
    d1, d2, d3 = chain(tmp_path, "stacked")
    tv = build_task_vectors([tmp_path / "s3"])
    assert len(tv.pool) == 3
    path = next(iter(SHAPES))
    np.testing.assert_allclose(
        tv.dense(0, path, torch.float64).numpy(), d1[path] + d2[path] + d3[path], atol=1e-12
    )


def test_missing_ancestor_is_a_clear_error(tmp_path):
    write_adapter(tmp_path / "s2", SHAPES, seed=2, lineage={"mode": "stacked", "parent": "../gone"})
    with pytest.raises(MergeInputError, match="lineage parent '../gone' not found"):
        build_task_vectors([tmp_path / "s2"])


def test_adapters_saved_by_different_transformers_versions_merge(tmp_path):
    old = {p: s for p, s in lm_modules(1, 8, 12, prefix="model.layers").items()}
    new = {p.replace("model.layers", "model.language_model.layers"): s for p, s in old.items()}
    d_old = write_adapter(tmp_path / "old", old, seed=1, base="Qwen/Qwen2.5-VL-7B-Instruct")
    d_new = write_adapter(
        tmp_path / "new", new, seed=2, base="unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit"
    )
    res = merge("task_arithmetic", [tmp_path / "old", tmp_path / "new"], tmp_path / "out")
    assert res.manifest["layout"] == "new"
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for p_old, p_new in zip(old, new):
        A = tensors[f"base_model.model.{p_new}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{p_new}.lora_B.weight"].double()
        np.testing.assert_allclose((B @ A).numpy(), d_old[p_old] + d_new[p_new], atol=1e-6)
    # asked for the legacy layout, the same merge writes model.layers.N
    res = merge(
        "task_arithmetic",
        [tmp_path / "old", tmp_path / "new"],
        tmp_path / "legacy",
        layout="qwen-legacy",
    )
    keys = load_file(str(tmp_path / "legacy" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)


def test_legacy_llava_adapter_folds_into_a_legacy_llava_checkpoint(tmp_path):
    new = {"model.language_model.layers.0.self_attn.q_proj": (8, 8)}
    old = {"language_model.model.layers.0.self_attn.q_proj": (8, 8)}
    d1 = write_adapter(tmp_path / "a", new, seed=1, base="llava-hf/llava-1.5-7b-hf")
    d2 = write_adapter(tmp_path / "b", old, seed=2, base="llava-hf/llava-1.5-7b-hf")
    base = write_base(
        tmp_path / "base",
        old,
        model_type="llava",
        extra={
            "vision_tower.vision_model.embeddings.patch_embedding.weight": (4, 3, 2, 2),
            "multi_modal_projector.linear_1.weight": (8, 4),
            "language_model.lm_head.weight": (20, 8),
        },
    )
    merge(
        "linear",
        [tmp_path / "a", tmp_path / "b"],
        tmp_path / "full",
        output="full",
        base=tmp_path / "base",
    )
    out = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert set(out) == set(base)  # every tensor kept, in the base's own layout
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    expect = base[key].double() + (d1[next(iter(new))] + d2[next(iter(old))]) / 2
    np.testing.assert_allclose(out[key].double().numpy(), expect.numpy(), atol=1e-6)
    for k in base:
        if k != key:
            assert torch.equal(out[k], base[k])


def test_embedding_and_fan_in_fan_out_loras(tmp_path):
    emb = {"model.embed_tokens": (30, 8)}
    d1 = write_adapter(tmp_path / "a", {}, embeddings=emb, seed=1)
    d2 = write_adapter(tmp_path / "b", {}, embeddings=emb, seed=2, r=3)
    base = write_base(tmp_path / "base", emb)
    merge(
        "ties",
        [tmp_path / "a", tmp_path / "b"],
        tmp_path / "full",
        params={"density": 1.0},
        output="full",
        base=tmp_path / "base",
        dtype="float64",
    )
    out = load_file(str(tmp_path / "full" / "model.safetensors"))
    t1, t2 = d1["model.embed_tokens"].numpy(), d2["model.embed_tokens"].numpy()
    elected = np.where(t1 + t2 >= 0, 1, -1)
    a1, a2 = np.sign(t1) == elected, np.sign(t2) == elected
    ref = (t1 * a1 + t2 * a2) / np.where(a1.astype(int) + a2 == 0, 1, a1.astype(int) + a2)
    np.testing.assert_allclose(
        out["model.embed_tokens.weight"].double().numpy(),
        base["model.embed_tokens.weight"].double().numpy() + ref,
        atol=1e-6,
    )
    # exact adapter output keeps the embedding kind
    merge("linear", [tmp_path / "a", tmp_path / "b"], tmp_path / "ad")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    A, B = (
        keys["base_model.model.model.embed_tokens.lora_embedding_A"],
        keys["base_model.model.model.embed_tokens.lora_embedding_B"],
    )
    np.testing.assert_allclose((B.double() @ A.double()).T.numpy(), (t1 + t2) / 2, atol=1e-6)

    conv = {"transformer.h.0.attn.c_attn": (8, 24)}  # GPT-2 Conv1D stores [in, out]
    write_adapter(tmp_path / "f1", conv, fan_in_fan_out=True, seed=4)
    c2 = write_adapter(tmp_path / "f2", conv, fan_in_fan_out=True, seed=5)
    tv = build_task_vectors([tmp_path / "f1", tmp_path / "f2"])
    assert tv.shapes["transformer.h.0.attn.c_attn"] == (8, 24)
    np.testing.assert_allclose(
        tv.dense(1, "transformer.h.0.attn.c_attn", torch.float64).numpy(),
        c2["transformer.h.0.attn.c_attn"],
        atol=1e-12,
    )
