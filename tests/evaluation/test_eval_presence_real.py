"""Why multi-label scoring scores label sets: an oracle on the real EmoComics35 test split.

A model that knows every gold label and answers the way training taught it (the labels in
``label_text`` order) puts its mass on the gold set as a whole answer. Scored by label sets
(presence = Σ p(S ∋ label)), it recovers every label; scored by each label as the first word of
the answer — the old default — it sees only the first label of each utterance, whatever the
threshold. Macro-F1 is computed with sklearn over the fixed label set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from emomerge.evaluation.decide import presence_labels, set_marginals, threshold_labels
from emomerge.evaluation.scoring import label_sets
from emomerge.training.data import read_dataset
from emomerge.training.data.emocomics35 import LABELS, label_text

CSV_NAME = "emocomics35/emocomics35_pg_images_original.csv"
#: ``<repo root>/../shared/data``: the real-format files, outside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def gold():
    path = SHARED_DATA / CSV_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found")
    test = read_dataset("emocomics35", path, "test", "utterance", allow_missing_images=True)
    return [list(s.labels) for s in test]


def macro_f1(gold, pred):
    mlb = MultiLabelBinarizer(classes=LABELS)
    return f1_score(mlb.fit_transform(gold), mlb.transform(pred), average="macro", zero_division=0)


def test_oracle_scored_by_label_sets_sees_every_label(gold):
    sets = label_sets(LABELS, 3)
    preds = []
    for g in gold:
        first3 = tuple(sorted(LABELS.index(lab) for lab in label_text(g).split(", ")[:3]))
        values = [0.0 if s == first3 else -30.0 for s in sets]  # the oracle's answer
        preds.append(
            presence_labels(set_marginals(values, sets, len(LABELS)), LABELS, [0.5] * len(LABELS))
        )
    f1 = macro_f1(gold, preds)
    assert f1 > 0.995  # all but the 3 utterances with four labels
    assert sum(len(g) > 3 for g in gold) == 3


def test_oracle_scored_by_first_label_tops_out_low(gold):
    # each label scored as the first word of the answer: the oracle's first word is the gold
    # set's first label in training's order; every threshold on the softmax is tried
    first = [label_text(g).split(", ")[0] for g in gold]
    values = [[0.0 if lab == f else -30.0 for lab in LABELS] for f in first]
    best = max(
        macro_f1(gold, [threshold_labels(v, LABELS, t) for v in values])
        for t in np.linspace(0.0, 1.0, 21)
    )
    assert best < 0.8
    # Surprise, last in the order, is rarely first: most of its utterances are missed
    carried = [g for g in gold if "Surprise" in g]
    assert sum(label_text(g).startswith("Surprise") for g in carried) / len(carried) < 0.3
