"""The prediction cache survives a kill mid-write and never mixes variants or splits."""

from __future__ import annotations

from emomerge.evaluation.cache import PredictionCache


def test_truncated_line_is_skipped_and_keys_are_separate(tmp_path):
    c = PredictionCache(tmp_path, "s1", "v" * 64)
    c.add("split-a", [{"id": "1", "text": "Joy"}, {"id": "2", "text": "Fear"}])
    c.add("split-b", [{"id": "1", "text": "Anger"}])
    with c.path.open("a") as fh:
        fh.write('{"variant": "' + "v" * 64 + '", "split": "split-a", "id": "3", "te')  # killed
    again = PredictionCache(tmp_path, "s1", "v" * 64)
    assert len(again) == 3
    assert (
        again.get("split-a", "1")["text"] == "Joy" and again.get("split-b", "1")["text"] == "Anger"
    )
    assert again.missing("split-a", ["1", "2", "3"]) == ["3"]
    # appending after the torn line starts a new line, so the new record is readable
    again.add("split-a", [{"id": "3", "text": "Sadness"}])
    assert PredictionCache(tmp_path, "s1", "v" * 64).get("split-a", "3")["text"] == "Sadness"
    # another variant hash (e.g. retrained weights) shares nothing, even under the same name
    assert len(PredictionCache(tmp_path, "s1", "w" * 64)) == 0
