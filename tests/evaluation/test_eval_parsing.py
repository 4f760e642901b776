"""The generation parser: every shape we have seen, and failures counted instead of guessed."""

from __future__ import annotations

import pytest

from emomerge.evaluation.parsing import label_lookup, parse_labels, parse_page

EC = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]


@pytest.mark.parametrize(
    "text, labels",
    [
        ("Joy", ["Joy"]),
        ("joy.", ["Joy"]),
        ("Happy", ["Joy"]),
        ("ANGRY", ["Anger"]),
        ('["Joy", "Fear"]', ["Joy", "Fear"]),
        ("['Joy', 'Fear']", ["Joy", "Fear"]),
        ("[Neutral]", ["Neutral"]),  # unquoted, as in the EmoComics35 CSV
        ("[Joy, Sadness]", ["Joy", "Sadness"]),
        ('```json\n["Surprise"]\n```', ["Surprise"]),
        ("```\nanger, fear\n```", ["Anger", "Fear"]),
        ('{"emotions": ["sad", "Fear"]}', ["Sadness", "Fear"]),
        ("Joy and Surprise", ["Joy", "Surprise"]),
        ("['Joy', 'joy', 'Happy']", ["Joy"]),  # duplicates collapse
    ],
)
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
    emoart = [
        "Calm",
        "Excited",
        "Contentment",
        "Frustrated",
        "Sad",
        "Aroused",
        "Alarmed",
        "Bored",
        "Happy",
        "Annoyed",
        "Tired",
        "Glad",
    ]
    lookup = label_lookup(emoart)
    assert "joy" not in lookup and lookup["happy"] == "Happy" and lookup["glad"] == "Glad"
    assert parse_labels("Joy", emoart, multi=False).failure == "out_of_set"
    assert parse_labels("Sadness", emoart, multi=False).labels == ["Sad"]


def test_page_answers_with_length_mismatch():
    per, extra = parse_page("[['Anger'], ['Fear', 'Sadness'], 'Joy']", 3, EC)
    assert [p.labels for p in per] == [["Anger"], ["Fear", "Sadness"], ["Joy"]] and extra == 0
    # CSV-style nested strings, one utterance short: the last is a 'missing' failure.
    per, extra = parse_page("```python\n[\"['Anger']\", \"['Shock']\"]\n```", 3, EC)
    assert per[0].labels == ["Anger"] and per[1].failure == "out_of_set"
    assert per[2].failure == "missing" and extra == 0
    per, extra = parse_page("['Joy', 'Joy', 'Joy', 'Fear']", 2, EC)
    assert all(p.ok for p in per) and extra == 2
    # The page task's own target shape (training.data.emocomics35, task "page").
    per, extra = parse_page(
        '[{"utterance": 1, "emotions": ["Joy"]}, {"utterance": 2, "emotions": ["Fear", "Anger"]}]',
        2,
        EC,
    )
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


EMOART = [
    "Calm",
    "Excited",
    "Contentment",
    "Frustrated",
    "Sad",
    "Aroused",
    "Alarmed",
    "Bored",
    "Happy",
    "Annoyed",
    "Tired",
    "Glad",
]


@pytest.mark.parametrize(
    "text, multi, labels",
    [
        ("Emotions: Joy, Fear", True, ["Joy", "Fear"]),
        ("emotion: joy", False, ["Joy"]),
        ("LABEL: Sadness", False, ["Sadness"]),
        ("Labels: anger; fear", True, ["Anger", "Fear"]),
        ("Answer: Surprise", False, ["Surprise"]),
        ("Sure! Emotion: Joy", False, ["Joy"]),  # the prefix inside a line
        ("Emotion:\nNeutral", False, ["Neutral"]),
        ('Emotions: ["Joy", "Fear"]', True, ["Joy", "Fear"]),  # a prefixed JSON list
        ("Emotion: Joy\nEmotion: Fear", True, ["Joy", "Fear"]),  # repeated at line starts
    ],
)
def test_label_prefix_is_dropped(text, multi, labels):
    got = parse_labels(text, EC, multi=multi)
    assert got.ok, got
    assert got.labels == labels and not got.lenient and got.invalid == []


@pytest.mark.parametrize(
    "text, labels",
    [
        ("angry and scared", ["Anger", "Fear"]),
        ("Joy, Fear and Sadness", ["Joy", "Fear", "Sadness"]),
        ("Joy, Fear, and Sadness", ["Joy", "Fear", "Sadness"]),  # Oxford comma
        ("happy AND surprised", ["Joy", "Surprise"]),
    ],
)
def test_and_splits_between_label_words(text, labels):
    got = parse_labels(text, EC, multi=True)
    assert got.ok and got.labels == labels and not got.lenient


def test_and_inside_a_sentence_does_not_split_it_into_fragments():
    # "and" joins two clauses here: splitting would give "The speaker is angry" and "the boy
    # is scared." as list items, both unreadable; as one sentence its label words are read.
    got = parse_labels("The speaker is angry and the boy is scared.", EC, multi=True)
    assert got.ok and got.labels == ["Anger", "Fear"] and got.lenient and got.invalid == []
    # "and" between a label word and a non-emotion word: no split either, the whole answer
    # is one sentence, and its one label word is read
    one = parse_labels("Joy and a big smile", EC, multi=True)
    assert one.ok and one.lenient and one.labels == ["Joy"] and one.invalid == []


def test_single_label_reads_the_first_line_only():
    got = parse_labels("Joy\nExplanation: the speaker smiles", EC, multi=False)
    assert got.ok and got.labels == ["Joy"] and not got.lenient
    # the explanation's own emotion words are not read as more labels
    got = parse_labels("Joy\nShe is smiling, though her friend looks sad.", EC, multi=False)
    assert got.ok and got.labels == ["Joy"]
    # a multi-label answer stops at the explanation, its label lines are all kept
    got = parse_labels("Joy\nFear\nExplanation: she smiles but is scared", EC, multi=True)
    assert got.ok and got.labels == ["Joy", "Fear"]
    got = parse_labels("Anger. Reason: he shouts and is scared", EC, multi=True)
    assert got.ok and got.labels == ["Anger"]


@pytest.mark.parametrize(
    "text, labels",
    [
        ("喜び", ["Joy"]),
        ("嬉しい", ["Joy"]),
        ("うれしい", ["Joy"]),
        ("楽しい", ["Joy"]),
        ("怒り", ["Anger"]),
        ("怒っている", ["Anger"]),
        ("悲しみ", ["Sadness"]),
        ("悲しい。", ["Sadness"]),
        ("恐怖", ["Fear"]),
        ("怖い", ["Fear"]),
        ("こわい", ["Fear"]),
        ("驚き", ["Surprise"]),
        ("驚いた", ["Surprise"]),
        ("嫌悪", ["Disgust"]),
        ("中立", ["Neutral"]),
        ("「喜び」", ["Joy"]),
        ("Emotion: 悲しみ", ["Sadness"]),
    ],
)
def test_japanese_emotion_words_map_through_their_group(text, labels):
    got = parse_labels(text, EC, multi=False)
    assert got.ok, got
    assert got.labels == labels


def test_japanese_lists_and_the_one_candidate_rule():
    got = parse_labels("怒り、恐怖", EC, multi=True)
    assert got.ok and got.labels == ["Anger", "Fear"]
    got = parse_labels("喜びと驚き", EC, multi=True)  # と between two words
    assert got.ok and got.labels == ["Joy", "Surprise"]
    # EmoArt has Happy and Glad, both in the joy group: 喜び must not choose between them
    joy = parse_labels("喜び", EMOART, multi=False)
    assert joy.failure == "out_of_set" and joy.invalid == ["喜び"] and joy.labels == []
    assert parse_labels("悲しい", EMOART, multi=False).labels == ["Sad"]
    assert parse_labels("興奮", EMOART, multi=False).labels == ["Excited"]
    # a Japanese emotion word of no task label is out of set (counted), not silently dropped
    other = parse_labels("喜び、不安", EC, multi=True)
    assert other.failure == "out_of_set" and other.labels == ["Joy"] and other.invalid == ["不安"]
    # a Japanese sentence is not scanned: out of set, kept as written
    sent = parse_labels("彼は怒っている", EC, multi=False)
    assert sent.failure == "out_of_set" and sent.labels == []


def test_new_rules_keep_the_old_failures():
    # negation after a prefix is still ambiguous, a prefixed list with an unknown item is
    # still not rescued by scanning
    neg = parse_labels("Emotion: not angry", EC, multi=False)
    assert neg.failure == "ambiguous" and neg.labels == [] and neg.invalid == ["not angry"]
    mixed = parse_labels("Emotions: Shock and joy", EC, multi=True)
    assert mixed.failure == "out_of_set" and not mixed.lenient
    assert mixed.labels == ["Joy"] and mixed.invalid == ["Shock"]
    several = parse_labels("Emotions: angry and scared", EC, multi=False)
    assert several.failure == "several_labels" and several.labels == ["Anger", "Fear"]


@pytest.mark.parametrize(
    "text, label",
    [
        ("yes - amusement", "yes"),  # EMID's own target
        ("Yes - awe", "yes"),
        ("no", "no"),
        ("No.", "no"),
        ("Answer: yes - anger", "yes"),
        ('"yes - fear"', "yes"),
        ("yes, the image evokes sadness", "yes"),
    ],
)
def test_a_yes_no_answer_is_read_from_its_leading_word(text, label):
    got = parse_labels(text, ["yes", "no"], multi=False)
    assert got.ok and got.labels == [label], got


def test_a_yes_no_answer_without_a_leading_yes_or_no_is_not_guessed_from_it():
    assert parse_labels("Not sure", ["yes", "no"], multi=False).labels == []
    assert parse_labels("Nobody knows", ["yes", "no"], multi=False).labels == []
    # the leading-word rule is for yes/no questions only
    assert not parse_labels("Joy - awe", EC, multi=False).ok


def test_emid_targets_generated_verbatim_score_every_answer_right(tmp_path):
    """A model that answers exactly the EMID reader's targets gets accuracy 1 in generation mode
    (the emotion after "yes -" was counted as an out-of-set label)."""
    import random

    from emomerge.evaluation.metrics import compute
    from emomerge.evaluation.outputs import from_generation
    from emomerge.training.data import read_dataset
    from emomerge.training.data.synthetic import write_emid

    write_emid(tmp_path, 12, random.Random(0))
    samples = read_dataset("emid", tmp_path, "test")
    assert {s.labels[0] for s in samples} == {"yes", "no"}
    assert any(s.target.startswith("yes - ") for s in samples)

    class Answers:  # the prediction cache: every generated answer is the sample's target
        def get(self, split_hash, sid):
            return {"text": next(s.target for s in samples if s.id == sid)}

    preds, report = from_generation("single", samples, Answers(), "h")
    assert report.failures == 0
    assert preds.pred == [s.labels[0] for s in samples]
    assert compute(preds)["accuracy"] == 1.0
