"""The generation parser: every shape we have seen, and failures counted instead of guessed."""

from __future__ import annotations

import pytest
from emomerge.evaluation.parsing import label_lookup, parse_labels, parse_page

EC = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]


@pytest.mark.parametrize("text, labels", [
    ("Joy", ["Joy"]),
    ("joy.", ["Joy"]),
    ("Happy", ["Joy"]),
    ("ANGRY", ["Anger"]),
    ('["Joy", "Fear"]', ["Joy", "Fear"]),
    ("['Joy', 'Fear']", ["Joy", "Fear"]),
    ("[Neutral]", ["Neutral"]),                      # unquoted, as in the EmoComics35 CSV
    ("[Joy, Sadness]", ["Joy", "Sadness"]),
    ("```json\n[\"Surprise\"]\n```", ["Surprise"]),
    ("```\nanger, fear\n```", ["Anger", "Fear"]),
    ('{"emotions": ["sad", "Fear"]}', ["Sadness", "Fear"]),
    ("Joy and Surprise", ["Joy", "Surprise"]),
    ("['Joy', 'joy', 'Happy']", ["Joy"]),            # duplicates collapse
])
def test_parses_multi_label_shapes(text, labels):
    got = parse_labels(text, EC, multi=True)
    assert got.ok, got
    assert got.labels == labels


def test_out_of_set_is_counted_not_mapped():
    got = parse_labels("Shock", EC, multi=False)
    assert not got.ok and got.failure == "out_of_set"
    assert got.labels == [] and got.invalid == ["Shock"]
    mixed = parse_labels("['Joy', 'Shock']", EC, multi=True)
    # The valid label is kept, the answer still counts as a failure.
    assert mixed.labels == ["Joy"] and mixed.invalid == ["Shock"] and not mixed.ok


def test_unparsable_and_empty():
    assert parse_labels("[1, 2]", EC, multi=True).failure == "unparsable"
    assert parse_labels("", EC, multi=True).failure == "empty"
    assert parse_labels("{'foo': 3}", EC, multi=True).failure == "unparsable"


def test_single_label_with_several_labels_fails():
    got = parse_labels("Joy, Fear", EC, multi=False)
    assert got.failure == "several_labels" and got.labels == ["Joy", "Fear"]


def test_free_text_is_scanned_for_label_words_and_flagged():
    got = parse_labels("The speaker is clearly angry here.", EC, multi=False)
    assert got.ok and got.labels == ["Anger"] and got.lenient
    assert parse_labels("The speaker is in shock.", EC, multi=False).failure == "out_of_set"


def test_synonym_never_chooses_between_two_classes():
    # EmoArt's set has both Happy and Glad: "joy" could mean either, so it stays out of set,
    # while "sadness" has one candidate (Sad) and maps.
    emoart = ["Calm", "Excited", "Contentment", "Frustrated", "Sad", "Aroused", "Alarmed",
              "Bored", "Happy", "Annoyed", "Tired", "Glad"]
    lookup = label_lookup(emoart)
    assert "joy" not in lookup and lookup["happy"] == "Happy" and lookup["glad"] == "Glad"
    assert parse_labels("Joy", emoart, multi=False).failure == "out_of_set"
    assert parse_labels("Sadness", emoart, multi=False).labels == ["Sad"]


def test_page_answers_with_length_mismatch():
    per, extra = parse_page("[['Anger'], ['Fear', 'Sadness'], 'Joy']", 3, EC)
    assert [p.labels for p in per] == [["Anger"], ["Fear", "Sadness"], ["Joy"]] and extra == 0
    # CSV-style nested strings, one utterance short: the last is a 'missing' failure.
    per, extra = parse_page('```python\n["[\'Anger\']", "[\'Shock\']"]\n```', 3, EC)
    assert per[0].labels == ["Anger"] and per[1].failure == "out_of_set"
    assert per[2].failure == "missing" and extra == 0
    per, extra = parse_page("['Joy', 'Joy', 'Joy', 'Fear']", 2, EC)
    assert all(p.ok for p in per) and extra == 2
    # The page task's own target shape (training.data.emocomics35, task "page").
    per, extra = parse_page('[{"utterance": 1, "emotions": ["Joy"]}, '
                            '{"utterance": 2, "emotions": ["Fear", "Anger"]}]', 2, EC)
    assert [p.labels for p in per] == [["Joy"], ["Fear", "Anger"]]
    per, extra = parse_page("no list here", 2, EC)
    assert [p.failure for p in per] == ["unparsable", "unparsable"]


@pytest.mark.parametrize("text", ["Shock, Joy", "Joy, Shock", "Shock and joy"])
def test_list_with_an_out_of_set_item_is_not_rescued_by_scanning(text):
    got = parse_labels(text, EC, multi=True)
    assert got.failure == "out_of_set" and not got.lenient
    assert got.labels == ["Joy"]
    assert [w.lower() for w in got.invalid] == ["shock"]


def test_sentence_with_an_out_of_set_emotion_word_is_a_failure():
    got = parse_labels("I feel shock but also joy.", EC, multi=True)
    assert got.failure == "out_of_set"
    assert got.labels == ["Joy"] and got.invalid == ["shock"]
    assert parse_labels("I feel shock but also joy.", EC, multi=False).failure == "out_of_set"


def test_negated_label_is_ambiguous_not_the_label():
    got = parse_labels("Not angry at all, calm", EC, multi=True)
    assert got.failure == "ambiguous"
    assert "Anger" not in got.labels and got.labels == []
    assert got.invalid == ["Not angry at all", "calm"]
    one = parse_labels("The speaker is not angry.", EC, multi=False)
    assert one.failure == "ambiguous" and one.labels == [] and one.invalid == ["not angry"]
    # a plain sentence still reads (and is flagged lenient)
    assert parse_labels("She is really happy.", EC, multi=False).labels == ["Joy"]


def test_page_answer_as_unquoted_nested_list():
    per, extra = parse_page("[[Neutral], [Joy, Fear]]", 2, EC)
    assert [p.labels for p in per] == [["Neutral"], ["Joy", "Fear"]] and extra == 0
    assert all(p.ok for p in per)
    per, _ = parse_page("[[Neutral], [Shock]]", 2, EC)
    assert per[0].ok and per[1].failure == "out_of_set" and per[1].invalid == ["Shock"]
    # text between the groups: not this shape, stays unparsable
    per, _ = parse_page("[[Neutral] then [Joy]]", 2, EC)
    assert [p.failure for p in per] == ["unparsable", "unparsable"]
