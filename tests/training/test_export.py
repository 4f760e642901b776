"""LLaMA-Factory export checked against its documented dataset and training-argument schema."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from emomerge.merging.errors import InputError
from emomerge.merging.lineage import StageMetadata
from emomerge.training.curriculum import parse_curriculum
from emomerge.training.export_llamafactory import (
    NO_PRE_RESIZE,
    export_llamafactory,
    export_precision,
)

# LLaMA-Factory's own argument names (hparams/model_args.py, data_args.py, finetuning_args.py);
# the rest must be transformers' Seq2SeqTrainingArguments fields (checked live below).
LF_ARGS = {
    "model_name_or_path",
    "adapter_name_or_path",
    "quantization_bit",
    "stage",
    "finetuning_type",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_rslora",
    "create_new_adapter",
    "freeze_vision_tower",
    "freeze_multi_modal_projector",
    "dataset",
    "dataset_dir",
    "template",
    "cutoff_len",
    "default_system",
    "image_max_pixels",
    "image_min_pixels",
}
# dataset_info.json keys documented in LLaMA-Factory's data/README.md.
INFO_KEYS = {"file_name", "formatting", "columns", "tags"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images"}
TAG_KEYS = {
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
}
TEMPLATES = {"qwen2_5_vl": "qwen2_vl", "llava": "llava"}
# the tiny Qwen2.5-VL processor: shortest_edge 56*56, longest_edge 112*112 (tiny.py)
PIXELS = {"qwen2_5_vl": (112 * 112, 56 * 56), "llava": (NO_PRE_RESIZE, 1)}


def _cur(base, synthetic, lineage):
    return {
        "base_model": str(base),
        "lineage": lineage,
        "seed": 7,
        "lora": {"r": 4, "alpha": 8},
        "stages": [
            {"name": "emid", "dataset": "emid", "path": str(synthetic["emid"]), "steps": 2},
            {"name": "art", "dataset": "emoart", "path": str(synthetic["emoart"]), "epochs": 2},
            {
                "name": "manga",
                "dataset": "mangavqa",
                "path": str(synthetic["mangavqa"]),
                "steps": 3,
            },
        ],
    }


@pytest.mark.parametrize("family,lineage", [("qwen2_5_vl", "continued"), ("llava", "stacked")])
def test_export_matches_the_documented_schema(tmp_path, tiny_model, synthetic, family, lineage):
    from transformers import Seq2SeqTrainingArguments

    out = export_llamafactory(_cur(tiny_model(family), synthetic, lineage), tmp_path / "lf")
    assert all(
        str(out) not in p.read_text(encoding="utf-8")
        for p in out.rglob("*")
        if p.is_file() and p.suffix != ".png"
    )  # all relative
    info = json.loads((out / "data" / "dataset_info.json").read_text())
    assert sorted(info) == ["emomerge_art", "emomerge_emid", "emomerge_manga"]
    trainer_fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    previous = []
    for i, stage in enumerate(["emid", "art", "manga"]):
        entry = info[f"emomerge_{stage}"]
        assert set(entry) <= INFO_KEYS and entry["formatting"] == "sharegpt"
        assert set(entry["columns"]) <= COLUMN_KEYS and set(entry["tags"]) <= TAG_KEYS
        lines = (out / "data" / entry["file_name"]).read_text(encoding="utf-8").splitlines()
        for line in lines:
            rec = json.loads(line)
            msgs = rec[entry["columns"]["messages"]]
            roles = [m[entry["tags"]["role_tag"]] for m in msgs]
            assert roles == [entry["tags"]["user_tag"], entry["tags"]["assistant_tag"]]
            images = rec[entry["columns"]["images"]]
            assert msgs[0]["content"].count("<image>") == len(images) == 1
            # relative to data/ (LLaMA-Factory's media_dir) when the export wrote the image
            assert all((out / "data" / p).is_file() for p in images)
        cfg = yaml.safe_load((out / f"{i + 1:02d}_{stage}.yaml").read_text())
        assert set(cfg) - LF_ARGS <= trainer_fields, set(cfg) - LF_ARGS - trainer_fields
        assert cfg["template"] == TEMPLATES[family] and cfg["dataset"] == f"emomerge_{stage}"
        assert cfg["dataset_dir"] == "data" and cfg["finetuning_type"] == "lora"
        assert cfg["output_dir"] == f"adapters/{stage}" and "trust_remote_code" not in cfg
        assert cfg["bf16"] is False and cfg["fp16"] is False  # CPU, train.dtype unset: fp32
        assert (
            "# precision: fp32 (train.dtype unset; no CUDA"
            in (out / f"{i + 1:02d}_{stage}.yaml").read_text()
        )
        assert cfg["freeze_vision_tower"] is True and cfg["lora_rank"] == 4
        assert (cfg["image_max_pixels"], cfg["image_min_pixels"]) == PIXELS[family]
        assert ("max_steps" in cfg) != ("num_train_epochs" in cfg)
        if i == 0:
            assert "adapter_name_or_path" not in cfg
        elif lineage == "continued":
            assert (
                cfg["adapter_name_or_path"] == previous[-1] and cfg["create_new_adapter"] is False
            )
        else:
            assert cfg["adapter_name_or_path"].split(",") == previous
            assert cfg["create_new_adapter"] is True
        previous.append(cfg["output_dir"])
        meta = StageMetadata.model_validate_json(
            (out / "adapters" / stage / "emomerge.json").read_text()
        )
        assert meta.lineage.mode == lineage and meta.stage_index == i
        assert meta.lineage.parent == (None if i == 0 else f"../{['emid', 'art'][i - 1]}")
        assert meta.lineage.parent_sha256 is None  # run.sh fills it once the parent is trained
        assert meta.trained_by == "llamafactory" and meta.lora["r"] == 4
        assert meta.image["family"] == family
    # EMID images live only inside the parquet: written out as files.
    assert len(list((out / "data" / "images" / "emid").glob("*.png"))) == len(
        (out / "data" / "emid.jsonl").read_text().splitlines()
    )
    run = (out / "run.sh").read_text()
    assert "llamafactory-cli train 01_emid.yaml" in run and 'cd "$(dirname "$0")"' in run
    assert run.count("fill_parent_sha256.py adapters/") == 2  # stages 2 and 3
    manga = (out / "data" / "manga.jsonl").read_text(encoding="utf-8")
    assert "ですか" in manga and "\\u" not in manga  # Japanese kept as UTF-8, not escaped


def test_export_refuses_a_non_empty_folder(tmp_path, tiny_model, synthetic):
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "keep").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_llamafactory(_cur(tiny_model("llava"), synthetic, "stacked"), tmp_path / "lf")
    assert [p.name for p in (tmp_path / "lf").iterdir()] == ["keep"]


def test_precision_follows_the_curriculum_then_the_machine(tiny_model, synthetic):
    cur = parse_curriculum(_cur(tiny_model("llava"), synthetic, "continued"))
    assert export_precision(cur, cuda=False, bf16_supported=False)[0] == "fp32"
    assert export_precision(cur, cuda=True, bf16_supported=False)[0] == "fp16"
    assert export_precision(cur, cuda=True, bf16_supported=True)[0] == "bf16"
    cur.train.dtype = "bfloat16"  # the curriculum wins over the machine
    assert export_precision(cur, cuda=False, bf16_supported=False) == (
        "bf16",
        "train.dtype: bfloat16",
    )


def test_explicit_precision_and_qwen_cap_reach_the_yaml(tmp_path, tiny_model, synthetic):
    raw = _cur(tiny_model("qwen2_5_vl"), synthetic, "continued")
    raw["train"] = {"max_pixels": 80 * 80}
    out = export_llamafactory(raw, tmp_path / "lf", precision="bf16")
    cfg = yaml.safe_load((out / "01_emid.yaml").read_text())
    assert (cfg["bf16"], cfg["fp16"]) == (True, False)
    assert (cfg["image_max_pixels"], cfg["image_min_pixels"]) == (6400, 3136)
    with pytest.raises(InputError, match="--precision must be"):
        export_llamafactory(raw, tmp_path / "lf2", precision="bfloat16")


def test_stacked_qlora_is_refused_in_one_line(tmp_path, tiny_model, synthetic):
    raw = _cur(tiny_model("llava"), synthetic, "stacked")
    raw["train"] = {"quantize_4bit": True}
    with pytest.raises(InputError, match="Cannot create new adapter upon a quantized model"):
        export_llamafactory(raw, tmp_path / "lf")
    assert not (tmp_path / "lf").exists()
    raw["lineage"] = "continued"  # one adapter trained on: what LLaMA-Factory accepts
    cfg = yaml.safe_load((export_llamafactory(raw, tmp_path / "lf") / "02_art.yaml").read_text())
    assert cfg["quantization_bit"] == 4 and cfg["create_new_adapter"] is False
    assert cfg["adapter_name_or_path"] == "adapters/emid" and cfg["bf16"] is True


def test_run_sh_skips_finished_stages_and_fills_the_parent_sha256(tmp_path, tiny_model, synthetic):
    """run.sh with a stand-in llamafactory-cli that writes what LLaMA-Factory writes."""
    import hashlib
    import os
    import subprocess
    import sys

    out = export_llamafactory(_cur(tiny_model("llava"), synthetic, "continued"), tmp_path / "lf")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llamafactory-cli"
    fake.write_text(
        '#!/bin/sh\nout=$(sed -n \'s/^output_dir: //p\' "$2")\necho "$2" >> calls\n'
        'printf \'weights-%s\' "$out" > "$out/adapter_model.safetensors"\n'
        "echo '{}' > \"$out/train_results.json\"\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    (out / "adapters" / "art" / "adapter_model.safetensors").write_bytes(b"partial")  # killed
    subprocess.run(["sh", str(out / "run.sh")], env=env, check=True, cwd=tmp_path)
    assert (out / "calls").read_text().split() == ["01_emid.yaml", "02_art.yaml", "03_manga.yaml"]
    art = json.loads((out / "adapters" / "art" / "emomerge.json").read_text())
    assert art["lineage"]["parent_sha256"] == hashlib.sha256(b"weights-adapters/emid").hexdigest()
    assert art["trained_by"] == "llamafactory"  # the rest of the document is kept
    (out / "calls").unlink()
    (out / "adapters" / "manga" / "train_results.json").unlink()  # stage 3 unfinished
    subprocess.run(["sh", str(out / "run.sh")], env=env, check=True, cwd=tmp_path)
    assert (out / "calls").read_text().split() == ["03_manga.yaml"]
