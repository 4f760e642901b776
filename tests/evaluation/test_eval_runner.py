"""End to end on tiny models: base, two stage adapters and two merges on two synthetic splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emomerge.evaluation.holdout import holdout_by_book
from emomerge.evaluation.leaderboard import compare, details_name, read_rows, show
from emomerge.evaluation.runner import EvalConfig, evaluate
from emomerge.evaluation.variants import discover
from emomerge.training.data import read_dataset


class Killed(Exception):
    """Stands in for the process dying between two flushed batches."""


@pytest.fixture(scope="module")
def variants(stage_dirs, merge_dirs):
    return discover([stage_dirs[0].parent, *merge_dirs])


@pytest.fixture(scope="module")
def ec35(emocomics_dir):
    test = read_dataset("emocomics35", emocomics_dir, "test")
    val = holdout_by_book(read_dataset("emocomics35", emocomics_dir, "train"), 0.2, seed=0)
    return test, val


def test_variants_metadata(variants):
    by = {v.name: v for v in variants}
    assert [v.name for v in variants] == ["s1_emoart", "s2_emocomics35", "linear", "ties"]
    assert by["s2_emocomics35"].kind == "stage" and by["s2_emocomics35"].stage_index == 1
    assert by["s2_emocomics35"].lineage == "continued"
    assert by["ties"].kind == "merged" and by["ties"].method == "ties"
    # the merge manifest resolves per-adapter parameters (one density per input adapter)
    assert json.loads(by["ties"].method_params)["density"] == [0.5, 0.5]
    assert by["linear"].stages_merged == "emoart;emocomics35"


def test_emocomics35_and_emoart_end_to_end(host, tiny_base, variants, ec35, emoart_dir, tmp_path):
    test, val = ec35
    assert any(len(s.labels) > 1 for s in test)  # multi-label utterances present
    cfg = EvalConfig(dataset="emocomics35", split="test", n_boot=50, seed=0)
    res = evaluate(host, tiny_base, variants, test, tmp_path, cfg, val_samples=val, progress=False)
    rows = res.rows
    assert [r["variant"] for r in rows] == [
        "base",
        "s1_emoart",
        "s2_emocomics35",
        "linear",
        "ties",
        "trivial-majority",
        "trivial-all-labels",
    ]
    assert [r["kind"] for r in rows] == [
        "base",
        "stage",
        "stage",
        "merged",
        "merged",
        "trivial",
        "trivial",
    ]
    # the all-labels row predicts every label for every utterance: its per-label recall is 1,
    # so each label's F1 is 2·support / (support + n), checked against the gold labels here
    lab_set = list(test[0].label_set)
    f1 = {
        lab: 2
        * sum(lab in s.labels for s in test)
        / (sum(lab in s.labels for s in test) + len(test))
        for lab in lab_set
    }
    assert rows[-1]["macro_f1"] == pytest.approx(sum(f1.values()) / len(lab_set))
    rows = rows[:5]
    for r in rows:
        assert r["n"] == len(test) and r["n_groups"] == len({s.group for s in test})
        for m in ("subset_accuracy", "example_f1", "macro_f1", "micro_f1"):
            assert 0.0 <= r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"] <= 1.0
        # the default baseline is the last stage: no p-value on its own row
        assert ("example_f1_p" not in r) == (r["variant"] == "s2_emocomics35")
    assert all(r.threshold is not None for r in res.results if r.variant.kind != "trivial")
    assert {r["threshold_source"] for r in rows} == {"validation-split"}
    # multi-label default: label sets, one threshold per label on presence probabilities
    assert {r.scoring for r in res.results if r.variant.kind != "trivial"} == {"label_set"}
    ties_row = next(r for r in rows if r["variant"] == "ties")
    info = json.loads((tmp_path / "details" / details_name(ties_row)).read_text())
    assert info["row"]["config_hash"] == ties_row["config_hash"]
    assert info["scoring"] == "label_set" and set(info["thresholds"]) == set(test[0].label_set)
    assert set(info["threshold_choice"].values()) <= {"label", "global"}
    ties = next(r for r in res.results if r.variant.name == "ties")
    assert info["threshold"] == ties.thresholds.global_threshold

    art = read_dataset("emoart", emoart_dir, "test")
    cfg2 = EvalConfig(dataset="emoart", split="test", n_boot=50, paired_test="mcnemar")
    rows2 = evaluate(host, tiny_base, variants, art, tmp_path, cfg2, progress=False).rows
    assert {r["task"] for r in rows2} == {"single"}
    assert all(0 <= r["accuracy"] <= 1 and r["parse_failures"] == 0 for r in rows2)
    # McNemar tests exact correctness: its p sits in the accuracy column only
    others = [r for r in rows2 if r["variant"] != r["baseline"]]
    assert others and all("accuracy_p" in r and "macro_f1_p" not in r for r in others)

    board = read_rows(tmp_path / "leaderboard.csv")
    assert len(board) == 13  # 5 variants + 2 trivial rows (multi-label), 5 + 1 (single-label)
    # Re-running the same command replaces its rows instead of appending duplicates.
    evaluate(host, tiny_base, variants, art, tmp_path, cfg2, progress=False)
    assert len(read_rows(tmp_path / "leaderboard.csv")) == 13
    table = show(tmp_path / "leaderboard.csv", by="macro_f1")
    assert table.count("\n") == 15 and "ties" in table
    assert "Δ macro_f1" in compare(tmp_path / "leaderboard.csv", tmp_path / "leaderboard.csv")
    details = sorted(p.name for p in (tmp_path / "details").iterdir())
    assert details_name(next(r for r in rows2 if r["variant"] == "ties")) in details


def test_killed_evaluation_reuses_its_cache(host, tiny_base, variants, ec35, tmp_path):
    test, _ = ec35
    variants = variants[:2]  # base + two stages are enough to show the resume
    cfg = EvalConfig(
        dataset="emocomics35", split="test", n_boot=20, batch_size=3, multilabel="topk"
    )
    seen: list[int] = []

    def die_after_first_batch(done: int) -> None:
        seen.append(done)
        if len(seen) == 2:  # base finished (one batch is 3 of 8), second batch of base
            raise Killed

    with pytest.raises(Killed):
        evaluate(
            host,
            tiny_base,
            variants,
            test,
            tmp_path / "run",
            cfg,
            progress=False,
            on_batch=die_after_first_batch,
        )
    cached = list((tmp_path / "run" / "predictions").glob("base.*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 6
    again = evaluate(host, tiny_base, variants, test, tmp_path / "run", cfg, progress=False)
    scored = {r.variant.name: r.scored for r in again.results if r.variant.kind != "trivial"}
    assert scored == {"base": len(test) - 6, "s1_emoart": len(test), "s2_emocomics35": len(test)}
    # A third run scores nothing and gives the same numbers as an uninterrupted run.
    third = evaluate(host, tiny_base, variants, test, tmp_path / "run", cfg, progress=False)
    assert all(r.scored == 0 for r in third.results)
    clean = evaluate(host, tiny_base, variants, test, tmp_path / "clean", cfg, progress=False)
    for a, b in zip(third.rows, clean.rows):
        assert a["example_f1"] == b["example_f1"] and a.get("macro_f1_p") == b.get("macro_f1_p")


def test_generation_mode_counts_parse_failures(host, tiny_base, variants, emoart_dir, tmp_path):
    art = read_dataset("emoart", emoart_dir, "test")[:4]
    cfg = EvalConfig(
        dataset="emoart",
        split="test",
        mode="generate",
        max_new_tokens=3,
        n_boot=20,
        batch_size=4,
        baseline="base",
    )
    res = evaluate(host, tiny_base, variants[:1], art, tmp_path, cfg, progress=False)
    for r, row in zip(res.results, res.rows):
        if r.variant.kind == "trivial":
            continue
        texts = [
            json.loads(line)["text"]
            for line in next((tmp_path / "predictions").glob(f"{r.variant.name}.*.jsonl")).open()
        ]
        assert len(texts) == len(art)
        # every answer is either a parsed label or counted, never dropped
        n_invalid = sum(p is None for p in r.preds.pred)
        assert row["parse_failures"] == r.parse.failures == n_invalid
        info = json.loads((tmp_path / "details" / details_name(row)).read_text())
        assert info["parse"]["failures"] == n_invalid


def test_scoring_settings_are_checked():
    from emomerge.merging.errors import InputError

    assert EvalConfig(dataset="emocomics35").resolved_scoring() == "label_set"
    assert (
        EvalConfig(dataset="emocomics35", scoring="first_label").resolved_scoring() == "first_label"
    )
    assert EvalConfig(dataset="emoart").resolved_scoring() == "label"
    assert EvalConfig(dataset="emocomics35", mode="generate").resolved_scoring() == ""
    with pytest.raises(InputError, match="--scoring label_set: only multi-label"):
        EvalConfig(dataset="emoart", scoring="label_set").check()
    with pytest.raises(InputError, match="--max-labels"):
        EvalConfig(dataset="emocomics35", max_labels=0).check()


def test_fixed_threshold_applies_to_every_label_presence(host, tiny_base, ec35, tmp_path):
    from emomerge.evaluation.cache import PredictionCache, stable_hash
    from emomerge.evaluation.outputs import presence
    from emomerge.evaluation.runner import inference_key, load_key, split_hash
    from emomerge.training.models.fingerprint import fingerprint

    test = ec35[0][:6]
    cfg = EvalConfig(dataset="emocomics35", threshold=0.2, n_boot=10)
    r = evaluate(host, tiny_base, [], test, tmp_path, cfg, progress=False).results[0]
    assert r.threshold_source == "fixed (--threshold)"
    assert r.thresholds.thresholds == {lab: 0.2 for lab in test[0].label_set}
    # the predictions are the labels whose presence probability clears 0.2 (argmax if none)
    infer = inference_key(host.processor, test, cfg, "likelihood", "label_set", family=host.family)
    infer["load"] = load_key(host.model, host.processor)  # how the base was loaded
    cache = PredictionCache(
        tmp_path / "predictions", "base", stable_hash([fingerprint(tiny_base), "", infer])
    )
    sh = split_hash(test)
    for s, pred in zip(test, r.preds.pred):
        m = presence(cache.get(sh, s.id), 7)
        assert len(cache.get(sh, s.id)["sets"]) == 63 and m.sum() > 1 - 1e-9
        want = [lab for lab, q in zip(s.label_set, m) if q >= 0.2] or [
            s.label_set[int(np.argmax(m))]
        ]
        assert pred == want


def test_how_the_base_was_loaded_keys_the_cache(host):
    """Another image cap (or dtype) changes every score: it is part of the cache key."""
    from emomerge.evaluation.runner import load_key

    ip = host.processor.image_processor
    before = load_key(host.model, host.processor)
    old = dict(ip.size)
    try:
        ip.size = {**old, "longest_edge": int(old["longest_edge"]) // 2}
        assert load_key(host.model, host.processor)["image"] != before["image"]
    finally:
        ip.size = old
    assert load_key(host.model, host.processor) == before
    assert before["dtype"] == str(host.model.dtype) and before["4bit"] is False


def test_each_config_keeps_its_own_details(host, tiny_base, variants, emoart_dir, tmp_path):
    """Re-evaluating a variant with other settings adds a row: its details sit beside the
    earlier row's instead of overwriting them, and each row's name leads to its own file."""
    art = read_dataset("emoart", emoart_dir, "test")[:6]
    boards = []
    for n_boot in (20, 30):  # n_boot is part of the config hash
        cfg = EvalConfig(dataset="emoart", split="test", n_boot=n_boot, baseline="base")
        boards.append(evaluate(host, tiny_base, variants[:1], art, tmp_path, cfg, progress=False))
    board = read_rows(tmp_path / "leaderboard.csv")
    base_rows = [r for r in board if r["variant"] == "base"]
    assert len(base_rows) == 2 and base_rows[0]["config_hash"] != base_rows[1]["config_hash"]
    files = sorted((tmp_path / "details").iterdir())
    assert len(files) == len(board)  # one details file per leaderboard row
    for row in board:
        info = json.loads((tmp_path / "details" / details_name(row)).read_text())
        assert info["row"]["config_hash"] == row["config_hash"]
        assert info["row"]["variant"] == row["variant"]


def test_details_names_never_collide():
    row = {
        "architecture": "qwen2_vl",
        "base_id": "/b",
        "variant": "a/b",
        "dataset": "emoart",
        "split": "test",
        "config_hash": "0123456789abcdef",
    }
    name = details_name(row)
    assert name.startswith("emoart__test__a_b__0123456789ab-") and name.endswith(".json")
    assert "/" not in name
    others = [
        {**row, "variant": "a_b"},
        {**row, "config_hash": "0123456789abffff"},  # same first 12 hex: the key hash differs
        {**row, "base_id": "/other"},
    ]
    names = {name, *(details_name(o) for o in others)}
    assert len(names) == 4
    assert details_name(dict(row)) == name  # stable: a re-run finds (and replaces) its file


def test_a_label_that_starts_another_needs_the_end_of_turn(host, tiny_base, tmp_path):
    """'Sad' and 'Sadness' scored as bare answers: P(Sadness) ≤ P(Sad) always, so 'Sadness'
    could never be predicted — refused (one line, nothing scored); with --append-eot the
    complete answers are compared and the evaluation runs."""
    from PIL import Image

    from emomerge.merging.errors import InputError
    from emomerge.training.data.sample import Sample

    samples = [
        Sample(
            id=f"s{i}",
            images=[Image.new("RGB", (32, 32), (i * 40, 0, 0))],
            target=lab,
            labels=[lab],
            label_set=["Happy", "Sad", "Sadness"],
            group=f"g{i}",
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}
            ],
        )
        for i, lab in enumerate(["Sad", "Sadness", "Happy", "Sad"])
    ]
    cfg = EvalConfig(dataset="emoart", split="test", task="single", mode="likelihood")
    with pytest.raises(
        InputError, match=r"emoart/test: label 'Sadness' starts with label 'Sad'.*--append-eot"
    ):
        evaluate(host, tiny_base, [], samples, tmp_path / "a", cfg, progress=False)
    assert not (tmp_path / "a").exists()
    cfg.append_eot = True
    rows = evaluate(host, tiny_base, [], samples, tmp_path / "b", cfg, progress=False).rows
    assert [r["variant"] for r in rows if r["kind"] == "base"] == ["base"]


def test_two_bases_in_one_folder_keep_their_own_holm_families_and_book_rows(
    host, tiny_base, variants, ec35, tmp_path
):
    """The same evaluation of two bases (here the same weights under another folder) into one
    results folder: each base's variants are tested against that base's own baseline, so Holm
    adjusts within a base (one test each here: adjusted p = raw p), and by_book.csv keeps both
    bases' rows with every identity column the leaderboard has."""
    import shutil

    from emomerge.evaluation.bybook import BY_BOOK_IDENTITY, read_by_book

    test, val = ec35
    other = shutil.copytree(tiny_base, tmp_path / "copy" / "tiny-qwen2_5_vl")
    cfg = EvalConfig(dataset="emocomics35", split="test", n_boot=20, seed=0)
    for base in (tiny_base, other):
        evaluate(
            host, base, variants[:1], test, tmp_path / "r", cfg, val_samples=val, progress=False
        )
    board = [r for r in read_rows(tmp_path / "r" / "leaderboard.csv") if r["kind"] == "base"]
    assert len({r["base_id"] for r in board}) == 2
    for r in board:
        assert r["macro_f1_p"] != "" and float(r["macro_f1_p_holm"]) == float(r["macro_f1_p"])
    books = read_by_book(tmp_path / "r" / "by_book.csv")
    assert {r["base_id"] for r in books} == {r["base_id"] for r in board}
    one = next(r for r in read_rows(tmp_path / "r" / "leaderboard.csv") if r["kind"] == "base")
    row = next(r for r in books if r["base_id"] == one["base_id"] and r["variant"] == "base")
    assert {k: row[k] for k in BY_BOOK_IDENTITY} == {k: one[k] for k in BY_BOOK_IDENTITY}
