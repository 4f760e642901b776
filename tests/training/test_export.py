"""LLaMA-Factory export checked against its documented dataset and training-argument schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import StageMetadata
from emomerge.training.export_llamafactory import export_llamafactory

# LLaMA-Factory's own argument names (hparams/model_args.py, data_args.py, finetuning_args.py);
# the rest must be transformers' Seq2SeqTrainingArguments fields (checked live below).
LF_ARGS = {"model_name_or_path", "trust_remote_code", "adapter_name_or_path", "quantization_bit",
           "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
           "use_rslora", "create_new_adapter", "freeze_vision_tower",
           "freeze_multi_modal_projector", "dataset", "dataset_dir", "template", "cutoff_len"}
# dataset_info.json keys documented in LLaMA-Factory's data/README.md.
INFO_KEYS = {"file_name", "formatting", "columns", "tags"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
            "function_tag", "system_tag"}
TEMPLATES = {"qwen2_5_vl": "qwen2_vl", "llava": "llava"}


def _cur(base, synthetic, lineage):
    return {"base_model": str(base), "lineage": lineage, "seed": 7,
            "lora": {"r": 4, "alpha": 8}, "stages": [
                {"name": "emid", "dataset": "emid", "path": str(synthetic["emid"]), "steps": 2},
                {"name": "art", "dataset": "emoart", "path": str(synthetic["emoart"]),
                 "epochs": 2},
                {"name": "manga", "dataset": "mangavqa", "path": str(synthetic["mangavqa"]),
                 "steps": 3}]}


@pytest.mark.parametrize("family,lineage", [("qwen2_5_vl", "continued"), ("llava", "stacked")])
def test_export_matches_the_documented_schema(tmp_path, tiny_model, synthetic, family, lineage):
    from transformers import Seq2SeqTrainingArguments

    out = export_llamafactory(_cur(tiny_model(family), synthetic, lineage), tmp_path / "lf")
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
            assert all(Path(p).is_absolute() and Path(p).is_file() for p in images)
        cfg = yaml.safe_load((out / f"{i + 1:02d}_{stage}.yaml").read_text())
        assert set(cfg) - LF_ARGS <= trainer_fields, set(cfg) - LF_ARGS - trainer_fields
        assert cfg["template"] == TEMPLATES[family] and cfg["dataset"] == f"emomerge_{stage}"
        assert cfg["dataset_dir"] == str(out / "data") and cfg["finetuning_type"] == "lora"
        assert cfg["freeze_vision_tower"] is True and cfg["lora_rank"] == 4
        assert ("max_steps" in cfg) != ("num_train_epochs" in cfg)
        if i == 0:
            assert "adapter_name_or_path" not in cfg
        elif lineage == "continued":
            assert cfg["adapter_name_or_path"] == previous[-1] and cfg["create_new_adapter"] is False
        else:
            assert cfg["adapter_name_or_path"].split(",") == previous
            assert cfg["create_new_adapter"] is True
        previous.append(cfg["output_dir"])
        meta = StageMetadata.model_validate_json((out / "lineage" / f"{stage}.json").read_text())
        assert meta.lineage.mode == lineage and meta.stage_index == i
        assert meta.lineage.parent == (None if i == 0 else f"../{['emid', 'art'][i - 1]}")
    # EMID images live only inside the parquet: written out as files.
    assert len(list((out / "data" / "images" / "emid").glob("*.png"))) == len(
        (out / "data" / "emid.jsonl").read_text().splitlines())
    assert "llamafactory-cli train 01_emid.yaml" in (out / "run.sh").read_text()
    manga = (out / "data" / "manga.jsonl").read_text(encoding="utf-8")
    assert "ですか" in manga and "\\u" not in manga  # Japanese kept as UTF-8, not escaped


def test_export_refuses_a_non_empty_folder(tmp_path, tiny_model, synthetic):
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "keep").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_llamafactory(_cur(tiny_model("llava"), synthetic, "stacked"), tmp_path / "lf")
    assert [p.name for p in (tmp_path / "lf").iterdir()] == ["keep"]
