"""Two-stage curricula (continued and stacked) on tiny models: adapters, lineage, resume, merge."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emomerge.merging.atomic import HOST, current_umask
from emomerge.merging.errors import InputError
from emomerge.merging.lineage import read_stage_metadata, resolve_parent
from emomerge.training.data import read_dataset, samples_sha256
from emomerge.training.trainer import train_curriculum


def dead_pid() -> int:
    """The pid of a process that has exited (a killed run's, for its leftover temporary)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _curriculum(base, data, lineage, stages, seed=0):
    return {
        "base_model": str(base),
        "lineage": lineage,
        "seed": seed,
        "lora": {"r": 4, "alpha": 8},
        "train": {"batch_size": 2, "lr": 5e-3},
        "stages": stages,
    }


@pytest.fixture(scope="module")
def continued(tiny_model, synthetic, tmp_path_factory):
    cur = _curriculum(
        tiny_model("qwen2_5_vl"),
        synthetic,
        "continued",
        [
            {"name": "emoart", "dataset": "emoart", "path": str(synthetic["emoart"]), "steps": 5},
            {
                "name": "ec35",
                "dataset": "emocomics35",
                "path": str(synthetic["emocomics35"]),
                "steps": 3,
                "max_samples": 12,
                "holdout": {"fraction": 0.1, "seed": 0},
            },
        ],
    )
    out = tmp_path_factory.mktemp("run_continued")
    start = time.perf_counter()
    dirs = train_curriculum(cur, out, progress=False)
    return cur, out, dirs, time.perf_counter() - start


@pytest.fixture(scope="module")
def stacked(tiny_model, synthetic, tmp_path_factory):
    cur = _curriculum(
        tiny_model("llava"),
        synthetic,
        "stacked",
        [
            {"name": "emid", "dataset": "emid", "path": str(synthetic["emid"]), "steps": 3},
            {
                "name": "manga",
                "dataset": "mangavqa",
                "path": str(synthetic["mangavqa"]),
                "steps": 3,
            },
        ],
    )
    out = tmp_path_factory.mktemp("run_stacked")
    start = time.perf_counter()
    dirs = train_curriculum(cur, out, progress=False)
    return cur, out, dirs, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("run", ["continued", "stacked"])
def test_two_stages_under_a_minute_with_lineage(request, run, tiny_model):
    cur, out, dirs, seconds = request.getfixturevalue(run)
    assert seconds < 60
    names = [s["name"] for s in cur["stages"]]
    assert dirs == [out / "adapters" / n for n in names]
    for i, folder in enumerate(dirs):
        assert {"adapter_config.json", "adapter_model.safetensors", "emomerge.json"} <= {
            p.name for p in folder.iterdir()
        }
        meta = read_stage_metadata(folder)
        assert meta.stage == names[i] and meta.stage_index == i
        assert meta.lineage.mode == run
        assert meta.base.name_or_path == cur["base_model"] and len(meta.base.hash) == 64
        assert meta.base.family == ("qwen2_5_vl" if run == "continued" else "llava")
        assert meta.seed == 0 and meta.steps == cur["stages"][i]["steps"]
        assert meta.final_loss == meta.loss_history[-1] and meta.final_loss > 0
        assert meta.dataset["name"] == cur["stages"][i]["dataset"]
        assert meta.dataset["split"] == "train" and len(meta.dataset["sha256"]) == 64
        assert meta.dataset["skipped_images"] == 0
        # provenance (DESIGN.md, Outputs): the versions that trained it, as installed
        assert meta.software["torch"] == metadata.version("torch")
        assert meta.software["peft"] == metadata.version("peft")
        assert meta.software["git_dirty"] in (True, False, None)
        # published like every output: the umask's modes, not a temporary folder's 0700
        umask = current_umask()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask}
        if i == 0:
            assert meta.lineage.parent is None
        else:
            assert meta.lineage.parent == f"../{names[i - 1]}"
            assert resolve_parent(folder, meta) == dirs[i - 1].resolve()
        keys = load_file(folder / "adapter_model.safetensors").keys()
        assert keys and all(".language_model." in k for k in keys)
    assert not list((out / "adapters").glob(".*"))  # no temporary folder left behind


def test_dataset_hash_is_the_data_the_stage_saw(continued, synthetic):
    _, _, dirs, _ = continued
    meta = read_stage_metadata(dirs[0])
    assert meta.dataset["sha256"] == samples_sha256(
        read_dataset("emoart", synthetic["emoart"], "train")
    )


def test_held_out_books_are_in_the_stage_metadata(continued, synthetic):
    from emomerge.evaluation.holdout import holdout_books

    meta = read_stage_metadata(continued[2][1])
    train = read_dataset("emocomics35", synthetic["emocomics35"], "train")
    assert meta.dataset["holdout"] == {
        "books": holdout_books(train, 0.1, seed=0),
        "fraction": 0.1,
        "seed": 0,
    }
    assert "holdout" not in read_stage_metadata(continued[2][0]).dataset


def test_loss_goes_down_on_the_learnable_signal(continued):
    losses = read_stage_metadata(continued[2][0]).loss_history
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_resume_keeps_finished_stages_and_reproduces_the_rest(continued, tmp_path):
    cur, _, dirs, _ = continued
    resumed = tmp_path / "resumed"
    shutil.copytree(dirs[0], resumed / "adapters" / "emoart")
    killed = resumed / "adapters" / f".ec35.tmp-{HOST}-{dead_pid()}-abcd"  # killed mid-stage
    killed.mkdir()
    # Another run writing to the same folder (a live process of this host): its temporary stays.
    other = subprocess.Popen(["sleep", "600"])
    live = resumed / "adapters" / f".emoart.tmp-{HOST}-{other.pid}-abcd"
    live.mkdir()
    (live / "adapter_model.safetensors").write_bytes(b"being written")
    before = {p.name: p.stat().st_mtime_ns for p in (resumed / "adapters" / "emoart").iterdir()}
    try:
        new_dirs = train_curriculum(cur, resumed, progress=False)
    finally:
        other.kill()
        other.wait()
    after = {p.name: p.stat().st_mtime_ns for p in (resumed / "adapters" / "emoart").iterdir()}
    assert before == after  # stage 1 not redone
    assert not killed.exists()
    assert (live / "adapter_model.safetensors").read_bytes() == b"being written"
    # Same weights as the uninterrupted run: a resumed stage starts from the same state.
    a = load_file(dirs[1] / "adapter_model.safetensors")
    b = load_file(new_dirs[1] / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ...down to the byte (the file, not only the tensors).
    assert (dirs[1] / "adapter_model.safetensors").read_bytes() == (
        new_dirs[1] / "adapter_model.safetensors"
    ).read_bytes()


def test_resume_with_other_settings_is_refused(continued, tmp_path):
    cur, _, dirs, _ = continued
    shutil.copytree(dirs[0], tmp_path / "adapters" / "emoart")
    with pytest.raises(InputError, match="different seed"):
        train_curriculum({**cur, "seed": 1}, tmp_path, progress=False)


def test_full_resume_of_a_finished_run_trains_nothing(continued):
    cur, out, dirs, _ = continued
    before = {d: (d / "adapter_model.safetensors").stat().st_mtime_ns for d in dirs}
    assert train_curriculum(cur, out, progress=False) == dirs
    assert before == {d: (d / "adapter_model.safetensors").stat().st_mtime_ns for d in dirs}


def _edit_stage(cur, i, **kw):
    stages = [dict(s) for s in cur["stages"]]
    stages[i].update(kw)
    return {**cur, "stages": stages}


@pytest.mark.parametrize(
    "edit,diff",
    [
        (lambda c: {**c, "lora": {"r": 2, "alpha": 8}}, "lora.r 4 -> 2"),
        (
            lambda c: {**c, "lora": {**c["lora"], "target_regex": r".*\.q_proj"}},
            "lora.target_regex",
        ),
        (lambda c: {**c, "train": {**c["train"], "lr": 1e-3}}, "train.lr 0.005 -> 0.001"),
        (lambda c: {**c, "train": {**c["train"], "grad_accum": 2}}, "train.grad_accum 1 -> 2"),
        (lambda c: _edit_stage(c, 0, steps=6), "stage.steps 5 -> 6"),
        (lambda c: _edit_stage(c, 0, steps=None, epochs=1), "stage.epochs None -> 1"),
        (lambda c: _edit_stage(c, 0, lr=1e-2), "train.lr 0.005 -> 0.01"),
    ],
    ids=["lora_r", "target_regex", "lr", "grad_accum", "steps", "epochs", "stage_lr"],
)
def test_resume_with_other_training_settings_is_refused(continued, tmp_path, edit, diff):
    cur, _, dirs, _ = continued
    shutil.copytree(dirs[0], tmp_path / "adapters" / "emoart")
    with pytest.raises(InputError) as exc:
        train_curriculum(edit(cur), tmp_path, progress=False)
    text = str(exc.value)
    assert (
        text.startswith(
            f"{tmp_path / 'adapters' / 'emoart'}: finished stage was trained "
            "with different settings"
        )
        and diff in text
        and "\n" not in text
    )
    assert "use a new --out folder" in text


def test_resume_refuses_a_stage_built_on_another_parent(continued, tmp_path):
    """Stage 1 replaced (retrained differently) under a finished stage 2: stage 2 is stale."""
    from safetensors.torch import save_file

    cur, _, dirs, _ = continued
    for d in dirs:
        shutil.copytree(d, tmp_path / "adapters" / d.name)
    weights = tmp_path / "adapters" / "emoart" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, weights)
    with pytest.raises(
        InputError,
        match=r"adapters/ec35: finished stage was built on another "
        r"emoart adapter \(lineage.parent_sha256",
    ):
        train_curriculum(cur, tmp_path, progress=False)


def test_resume_refuses_a_stage_without_a_settings_fingerprint(continued, tmp_path):
    import json

    cur, _, dirs, _ = continued
    folder = tmp_path / "adapters" / "emoart"
    shutil.copytree(dirs[0], folder)
    meta = json.loads((folder / "emomerge.json").read_text())
    del meta["settings_sha256"]
    (folder / "emomerge.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="records no settings_sha256"):
        train_curriculum(cur, tmp_path, progress=False, max_stages=1)


def test_half_written_stage_folder_is_refused(continued, tmp_path):
    cur, _, _, _ = continued
    (tmp_path / "adapters" / "emoart").mkdir(parents=True)
    with pytest.raises(InputError, match="not a finished stage adapter"):
        train_curriculum(cur, tmp_path, progress=False, max_stages=1)


def _fold(base, adapters):
    """Reference: the base with each adapter folded in order by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    for folder in adapters:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model


@pytest.mark.parametrize("run", ["continued", "stacked"])
def test_stage_adapters_merge_with_the_merging_core(request, run, tmp_path):
    """Merging the last stage (reference base) gives what its lineage says it was trained on."""
    from transformers import AutoModelForImageTextToText

    from emomerge.merging import merge

    cur, _, dirs, _ = request.getfixturevalue(run)
    result = merge("linear", [dirs[-1]], tmp_path / "merged", output="full", base=cur["base_model"])
    merged = AutoModelForImageTextToText.from_pretrained(getattr(result, "out", result))
    # continued: stage 2's ΔW is cumulative; stacked: base + ΔW1 + ΔW2 along the chain.
    reference = _fold(cur["base_model"], dirs[-1:] if run == "continued" else dirs)
    ref_state = reference.state_dict()
    base_state = AutoModelForImageTextToText.from_pretrained(cur["base_model"]).state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, ref_state[name], atol=1e-5), name
    changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, base_state[n])]
    assert changed and all(".language_model." in f".{n}" for n in changed)
    # Linear merge of both stages as an adapter also loads.
    both = merge("linear", dirs, tmp_path / "both")
    assert (getattr(both, "out", both) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("run", ["continued", "stacked"])
def test_load_stage_model_follows_the_lineage(request, run):
    from emomerge.training.inference import lineage_chain, load_stage_model

    cur, _, dirs, _ = request.getfixturevalue(run)
    want = [d.resolve() for d in (dirs if run == "stacked" else dirs[-1:])]
    assert lineage_chain(dirs[-1]) == want
    model, _, family = load_stage_model(dirs[-1], merge=True)
    reference = _fold(cur["base_model"], want).state_dict()
    assert family == ("qwen2_5_vl" if run == "continued" else "llava")
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name


@pytest.mark.parametrize("run", ["continued", "stacked"])
def test_continued_keeps_the_lora_stacked_starts_fresh(request, run):
    """Training semantics, not just labels: stage 2's A factors continue stage 1's or restart."""
    _, _, dirs, _ = request.getfixturevalue(run)
    first = load_file(dirs[0] / "adapter_model.safetensors")
    second = load_file(dirs[1] / "adapter_model.safetensors")
    a_keys = [k for k in first if "lora_A" in k]
    rel = max(float((second[k] - first[k]).norm() / first[k].norm()) for k in a_keys)
    # A few small steps move A by a fraction of its norm; a fresh draw is ~√2 away.
    assert rel < 0.5 if run == "continued" else rel > 1.0


def test_llava_stage_trained_before_the_answer_prefix_is_not_resumed(stacked, continued, tmp_path):
    # LLaVA stages record that answers follow the template's space ("ASSISTANT: Joy"); a stage
    # recorded without it (trained as "ASSISTANT:Joy" by an older emomerge) is refused on
    # resume, while Qwen's settings (no prefix) are unchanged
    import json

    from emomerge.training.stages import settings_sha256

    cur, _, dirs, _ = stacked
    meta = json.loads((dirs[0] / "emomerge.json").read_text())
    assert meta["settings"]["answer"] == "after_template_prefix"
    qwen = json.loads((continued[2][0] / "emomerge.json").read_text())
    assert "answer" not in qwen["settings"]
    old = tmp_path / "adapters" / dirs[0].name
    shutil.copytree(dirs[0], old)
    del meta["settings"]["answer"]
    meta["settings_sha256"] = settings_sha256(meta["settings"])
    (old / "emomerge.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="answer '<unset>' -> 'after_template_prefix'"):
        train_curriculum(cur, tmp_path, progress=False)


@pytest.mark.parametrize(
    "run,key,value", [("stacked", "prompt", "bos"), ("continued", "answer_tail", "\n")]
)
def test_stage_trained_on_the_text_before_parity_is_not_resumed(request, tmp_path, run, key, value):
    # LLaVA prompts open with the BOS and Qwen answers end "<|im_end|>\n" (LLaMA-Factory parity):
    # the stages record it, and a stage recorded without it (an older emomerge's text) is refused
    import json
    import re

    from emomerge.training.stages import settings_sha256, text_format

    cur, _, dirs, _ = request.getfixturevalue(run)
    meta = json.loads((dirs[0] / "emomerge.json").read_text())
    assert meta["settings"][key] == value
    old = tmp_path / "adapters" / dirs[0].name
    shutil.copytree(dirs[0], old)
    del meta["settings"][key]
    meta["settings_sha256"] = settings_sha256(meta["settings"])
    (old / "emomerge.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=re.escape(f"{key} '<unset>' -> {value!r}")):
        train_curriculum(cur, tmp_path, progress=False)
    # the families whose text did not change keep their fingerprint
    assert text_format("mllama") == text_format("pixtral") == {}
    assert text_format("llava_next") == {"answer": "after_template_prefix", "prompt": "bos"}
    assert text_format("qwen3_vl") == {"answer_tail": "\n"}


# --- unreadable images and determinism ------------------------------------------------------


def test_unreadable_images_are_skipped_and_counted_in_the_stage_metadata(
    tiny_model, synthetic, tmp_path
):
    root = tmp_path / "emoart"
    shutil.copytree(synthetic["emoart"], root)
    samples = read_dataset("emoart", root, "train")
    (Path(samples[2].images[0])).write_bytes(b"not a jpeg")
    cur = _curriculum(
        tiny_model("qwen2_5_vl"),
        synthetic,
        "continued",
        [{"name": "emoart", "dataset": "emoart", "path": str(root), "steps": 1}],
    )
    with pytest.warns(UserWarning, match=r"stages.0 \(emoart\): skipped 1 unreadable image files"):
        (folder,) = train_curriculum(cur, tmp_path / "run", progress=False, max_bad_image_share=0.1)
    meta = read_stage_metadata(folder)
    kept = samples[:2] + samples[3:]
    assert meta.dataset["skipped_images"] == 1
    assert meta.dataset["samples"] == len(samples) - 1
    assert meta.dataset["sha256"] == samples_sha256(kept)  # the data the stage trained on
    before = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):  # resumed: same skip, no retrain
        train_curriculum(cur, tmp_path / "run", progress=False, max_bad_image_share=0.1)
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(InputError, match=r"stages.0 \(emoart\): 1 of \d+ image files unreadable"):
        train_curriculum(cur, tmp_path / "run2", progress=False)  # default 5 %: 1 of 19 is more
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_emomerge_train_is_byte_deterministic_across_runs_and_a_resume(
    tiny_model, synthetic, tmp_path
):
    """The same curriculum and seed give the same adapter bytes: twice, and after a kill."""
    import yaml
    from typer.testing import CliRunner

    from emomerge.cli import app

    cur = tmp_path / "cur.yaml"
    cur.write_text(
        yaml.safe_dump(
            _curriculum(
                tiny_model("qwen2_5_vl"),
                synthetic,
                "continued",
                [
                    {
                        "name": "emoart",
                        "dataset": "emoart",
                        "path": str(synthetic["emoart"]),
                        "steps": 3,
                    },
                    {"name": "emid", "dataset": "emid", "path": str(synthetic["emid"]), "steps": 2},
                ],
                seed=7,
            )
        )
    )

    def train(out):
        result = CliRunner().invoke(app, ["train", str(cur), "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        return {
            d: (out / "adapters" / d / "adapter_model.safetensors").read_bytes()
            for d in ("emoart", "emid")
        }

    first, second = train(tmp_path / "a"), train(tmp_path / "b")
    assert first == second
    # Killed during stage 2: stage 1 finished, stage 2's temporary folder left behind.
    resumed = tmp_path / "c"
    shutil.copytree(tmp_path / "a" / "adapters" / "emoart", resumed / "adapters" / "emoart")
    killed = resumed / "adapters" / f".emid.tmp-{HOST}-{dead_pid()}-abcd"
    killed.mkdir()
    assert train(resumed) == first
    assert not killed.exists()
    # The bytes follow the seed (the comparison above can fail).
    cur.write_text(cur.read_text().replace("seed: 7", "seed: 8"))
    assert train(tmp_path / "d")["emoart"] != first["emoart"]


# --- image cap and activation checkpointing in the stage record --------------------------------


def test_stage_records_the_resolved_image_cap_and_checkpointing(continued):
    _, _, dirs, _ = continued
    meta = read_stage_metadata(dirs[0])
    image = meta.model_extra["image"]
    # the tiny checkpoint's own limit (112 x 112 px) is below the family default: unchanged
    assert image["family"] == "qwen2_5_vl" and image["max_pixels"] is None
    assert image["source"] == "checkpoint" and image["pixels_limit"] == 112 * 112
    assert image["settings"] == {
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "merge_size": 2,
    }
    assert image["page_tokens"] == 12  # 4 x 3 blocks of 28 px (112 x 84) for a page
    assert meta.model_extra["train"]["gradient_checkpointing"] is False  # auto on CPU
    # keys left at their defaults are not in the fingerprint: stages trained before they
    # existed keep their settings_sha256
    assert set(meta.model_extra["settings"]["train"]) == {
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "dtype",
        "quantize_4bit",
        "scheduler",
        "warmup_ratio",
    }


def test_an_explicit_image_cap_is_part_of_the_fingerprint(continued, tmp_path):
    cur, _, dirs, _ = continued
    shutil.copytree(dirs[0], tmp_path / "adapters" / "emoart")
    with pytest.raises(InputError, match=r"train.max_pixels '<unset>' -> 6272"):
        train_curriculum(
            {**cur, "train": {**cur["train"], "max_pixels": 6272}},
            tmp_path,
            progress=False,
            max_stages=1,
        )


def test_checkpointing_does_not_change_the_fingerprint(continued, tmp_path):
    cur, _, dirs, _ = continued
    shutil.copytree(dirs[0], tmp_path / "adapters" / "emoart")
    done = train_curriculum(
        {**cur, "train": {**cur["train"], "gradient_checkpointing": True}},
        tmp_path,
        progress=False,
        max_stages=1,
    )
    assert done == [tmp_path / "adapters" / "emoart"]  # resumed, not refused


def test_a_stage_trained_at_another_resolution_is_not_resumed(continued, tmp_path):
    import json

    cur, _, dirs, _ = continued
    folder = tmp_path / "adapters" / "emoart"
    shutil.copytree(dirs[0], folder)
    meta = json.loads((folder / "emomerge.json").read_text())
    meta["image"]["settings"]["max_pixels"] = 12845056  # e.g. trained before a default changed
    (folder / "emomerge.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="trained at another image resolution"):
        train_curriculum(cur, tmp_path, progress=False, max_stages=1)
    del meta["image"]  # a stage from before the cap existed records none: resumed
    (folder / "emomerge.json").write_text(json.dumps(meta))
    assert train_curriculum(cur, tmp_path, progress=False, max_stages=1) == [folder]
