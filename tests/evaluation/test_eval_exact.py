"""Exact evaluation of sparse merges: merged weights written into the loaded base, then removed.

Oracles: the ``--output full`` folder loaded as a plain model by transformers (its logits must
equal the in-place ones bit for bit), and a sha256 of every base tensor taken before (equal
afterwards). The rank-limited adapter of the same merge must differ and say ``lowrank``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emomerge.evaluation.inplace import FULL, STREAMED, check_exact
from emomerge.evaluation.predict import ModelHost
from emomerge.evaluation.variants import discover, variant_from_dir
from emomerge.merging import merge
from emomerge.merging.errors import InputError
from emomerge.training.models.fingerprint import fingerprint

DENSITY = {"density": 0.5}


def state_sha256(model) -> str:
    """sha256 of every base tensor (LoRA factors of adapters loaded meanwhile left out)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def last_logits(model, processor, samples) -> torch.Tensor:
    """Next-token logits after each sample's prompt (images through the processor)."""
    from emomerge.training.models.batching import rgb_images

    out = []
    with torch.inference_mode():
        for s in samples:
            prompt = processor.apply_chat_template(
                s.messages, add_generation_prompt=True, tokenize=False
            )
            images = rgb_images(s.images)
            inputs = processor(
                text=[prompt], images=images or None, return_tensors="pt", add_special_tokens=False
            )
            out.append(model(**inputs).logits[0, -1].float())
    return torch.stack(out)


@pytest.fixture(scope="module")
def samples(emocomics_dir):
    from emomerge.training.data import read_dataset

    return read_dataset("emocomics35", emocomics_dir, "test", "utterance")[:4]


@pytest.fixture(scope="module")
def ties(stage_dirs, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    low = merge("ties", stage_dirs, root / "ties", params=DENSITY, rank=2).out
    full = merge(
        "ties", stage_dirs, root / "ties-full", params=DENSITY, output="full", base=tiny_base
    ).out
    return Path(low), Path(full)


def test_in_place_equals_full_folder_and_restores_the_base(host, stage_dirs, ties, samples):
    low_dir, full_dir = ties
    # a stage first, so the base is wrapped by PEFT (base_layer names) as in a real run
    with host.activate(variant_from_dir(stage_dirs[0])) as m:
        stage = last_logits(m, host.processor, samples)
    before = state_sha256(host.model)

    exact = variant_from_dir(low_dir)
    full = variant_from_dir(full_dir)
    low = variant_from_dir(low_dir, exact=False)
    assert (exact.exact, exact.representation) == (STREAMED, "exact")
    assert (full.exact, full.kind, full.method) == (FULL, "merged", "ties")
    assert (low.exact, low.representation, low.represented_rank) == (None, "lowrank", 2)
    assert low.lowrank_error_mean > 0.05 and low.lowrank_error_max >= low.lowrank_error_mean

    got = {}
    for v in (exact, full, low):
        with host.activate(v) as m:
            got[v.exact or "lowrank"] = last_logits(m, host.processor, samples)
    assert state_sha256(host.model) == before  # restored bit for bit

    plain = ModelHost.load(full_dir)  # the full folder as an ordinary model
    oracle = last_logits(plain.model, plain.processor, samples)
    assert torch.equal(got[STREAMED], oracle)
    assert torch.equal(got[FULL], oracle)
    assert (got["lowrank"] - oracle).abs().max() > 1e-4  # the re-factorised adapter is not TIES
    with host.activate(variant_from_dir(stage_dirs[0])) as m:  # adapters still switch right
        assert torch.equal(last_logits(m, host.processor, samples), stage)


def test_content_hashes_tell_exact_and_lowrank_apart(ties):
    low_dir, full_dir = ties
    hashes = {
        variant_from_dir(low_dir).content_hash,
        variant_from_dir(low_dir, exact=False).content_hash,
        variant_from_dir(full_dir).content_hash,
    }
    assert len(hashes) == 3


def test_discover_takes_full_folders(ties):
    low_dir, full_dir = ties
    found = {v.name: v for v in discover([low_dir.parent])}
    assert found["ties-full"].exact == FULL and found["ties"].exact == STREAMED


def test_changed_input_falls_back_to_lowrank_and_says_why(stage_dirs, tmp_path):
    a, b = (shutil.copytree(d, tmp_path / d.name) for d in stage_dirs)
    out = merge("ties", [a, b], tmp_path / "m", params=DENSITY, rank=2).out
    weights = Path(b) / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    v = variant_from_dir(out)
    assert v.exact is None and v.representation == "lowrank"
    assert "changed since the merge" in v.note


def test_full_folder_of_another_base_is_refused(host, stage_dirs, tmp_path):
    from emomerge.training.models.tiny import build_tiny_vlm

    other = build_tiny_vlm("qwen2_5_vl", tmp_path / "other-base", seed=1)
    out = merge(
        "ties", stage_dirs, tmp_path / "full-other", params=DENSITY, output="full", base=other
    ).out
    v = variant_from_dir(out)
    with pytest.raises(InputError, match="merged into another base"):
        check_exact(host.model, v, host.base_path, fingerprint(host.base_path))


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda t: t.pop(next(k for k in sorted(t) if "layers.1.mlp.up_proj" in k)),
            "of the base's tensors are missing",
        ),
        (
            lambda t: t.__setitem__(
                next(k for k in sorted(t) if "layers.0.mlp.down_proj" in k), torch.zeros(3, 3)
            ),
            "but the base's is",
        ),
    ],
)
def test_incomplete_full_folder_is_refused(host, ties, tmp_path, damage, message):
    folder = shutil.copytree(ties[1], tmp_path / "broken")
    _rewrite(Path(folder), damage)
    v = variant_from_dir(folder)
    before = state_sha256(host.model)
    with pytest.raises(InputError, match=message):
        check_exact(host.model, v, host.base_path, fingerprint(host.base_path))
    assert state_sha256(host.model) == before


def test_rows_say_how_each_merge_was_represented(host, tiny_base, ties, emocomics_dir, tmp_path):
    """Through the runner: exact (streamed) and full-folder rows give identical per-example
    scores; the rank-2 adapter of the same merge differs and its row says lowrank + error."""
    import json

    from emomerge.evaluation.pipeline import load_split
    from emomerge.evaluation.runner import EvalConfig, evaluate

    low_dir, full_dir = ties
    test = load_split("emocomics35", emocomics_dir, "test", "utterance")[:6]
    exact, low = (
        variant_from_dir(low_dir, name="ties"),
        variant_from_dir(low_dir, exact=False, name="ties-rank2"),
    )
    full = variant_from_dir(full_dir, name="ties-full")
    cfg = EvalConfig(dataset="emocomics35", split="test", threshold=0.3, n_boot=20, baseline="base")
    res = evaluate(host, tiny_base, [exact, full, low], test, tmp_path, cfg, progress=False)
    rows = {r["variant"]: r for r in res.rows}

    def records(name):
        path = next((tmp_path / "predictions").glob(f"{name}.*.jsonl"))
        return sorted((r["id"], r["scores"]) for r in map(json.loads, path.open()))

    assert records("ties") == records("ties-full")  # same scores, bit for bit
    assert records("ties") != records("ties-rank2")
    assert (rows["ties"]["representation"], rows["ties-full"]["representation"]) == (
        "exact",
        "exact",
    )
    low_row = rows["ties-rank2"]
    assert low_row["representation"] == "lowrank" and low_row["represented_rank"] == 2
    manifest = json.loads((low_dir / "emomerge.json").read_text())
    assert low_row["lowrank_error_mean"] == manifest["errors"]["mean"] > 0


def test_cli_refuses_a_broken_full_folder_before_scoring(tiny_base, ties, emocomics_dir, tmp_path):
    from typer.testing import CliRunner

    from emomerge.cli import app

    folder = Path(shutil.copytree(ties[1], tmp_path / "broken"))
    _rewrite(folder, lambda t: t.pop(next(k for k in sorted(t) if "layers.1.mlp.up_proj" in k)))
    out = tmp_path / "results"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--base",
            str(tiny_base),
            "--variants",
            str(folder),
            "--dataset",
            "emocomics35",
            "--data",
            str(emocomics_dir),
            "--task",
            "utterance",
            "--threshold",
            "0.3",
            "--out",
            str(out),
            "--n-boot",
            "20",
        ],
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and str(folder) in lines[0]
    assert not (out / "predictions").exists()  # refused before anything was scored
    assert "Loading weights" not in res.output  # ... before the base was even loaded


def test_an_unreadable_image_is_skipped_and_counted(tiny_base, tmp_path):
    """A corrupt page image: its utterances leave the split, the row counts the file (one bad
    file in at least 20 is under the 5 % tolerance)."""
    from emomerge.evaluation.pipeline import evaluate_paths, load_split
    from emomerge.evaluation.runner import EvalConfig
    from emomerge.training.data.synthetic import write_synthetic

    data = write_synthetic("emocomics35", tmp_path / "data", n=96, seed=0)
    test = load_split("emocomics35", data, "test", "utterance")
    assert len({s.images[0] for s in test}) >= 20
    page = Path(test[0].images[0])
    on_page = sum(Path(s.images[0]) == page for s in test)
    page.write_bytes(b"not an image")
    cfg = EvalConfig(dataset="emocomics35", split="test", threshold=0.3, n_boot=20, baseline="base")
    with pytest.warns(UserWarning):
        res = evaluate_paths(
            tiny_base, [], data, tmp_path / "out", cfg, reader_task="utterance", progress=False
        )
    row = res.rows[0]
    assert (row["variant"], row["skipped_images"], row["n"]) == ("base", 1, len(test) - on_page)


def test_an_edited_input_config_changes_the_exact_merge_key(stage_dirs, tmp_path):
    """The LoRA scale lives in adapter_config.json: editing it changes the recomputed merge, so
    the variant's content hash (its prediction-cache key) must change with it."""
    import json

    a, b = (shutil.copytree(d, tmp_path / d.name) for d in stage_dirs)
    out = merge("ties", [a, b], tmp_path / "m", params=DENSITY, rank=2).out
    before = variant_from_dir(out).content_hash
    config = Path(a) / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw["lora_alpha"] = raw["lora_alpha"] * 4
    config.write_text(json.dumps(raw))
    assert variant_from_dir(out).content_hash != before


def test_an_edited_input_config_falls_back_to_lowrank(stage_dirs, tmp_path):
    """The manifest records each input's config sha256: an edit after the merge is caught."""
    import json

    a, b = (shutil.copytree(d, tmp_path / d.name) for d in stage_dirs)
    out = merge("ties", [a, b], tmp_path / "m", params=DENSITY, rank=2).out
    config = Path(b) / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw["lora_alpha"] = raw["lora_alpha"] * 2
    config.write_text(json.dumps(raw))
    v = variant_from_dir(out)
    assert (v.exact, v.representation) == (None, "lowrank")
    assert "adapter_config.json changed since the merge" in v.note
