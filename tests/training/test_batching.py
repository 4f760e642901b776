"""Batches: images through each family's processor, loss on the answer tokens only."""

from __future__ import annotations

import pytest
from emomerge.training.batching import IGNORE_INDEX, encode_batch
from emomerge.training.data.sample import Sample, user_message
from emomerge.training.families import FAMILIES
from emomerge.training.models import load_vlm
from PIL import Image

from .conftest import ALL_FAMILIES


def _samples() -> list[Sample]:
    # Different image sizes and prompt lengths so padding and image expansion differ per row.
    return [Sample(id=str(i), images=[Image.new("RGB", (40 + 30 * i, 50), (200, 20 * i, 0))],
                   messages=user_message(1, "Which emotion?" + " more words" * 3 * i),
                   target=target, labels=[], label_set=[], group=str(i))
            for i, target in enumerate(["Anger", "Joy, Fear", "喜び"])]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_labels_are_exactly_the_answer_tokens(tiny_model, family):
    model, processor, fam = load_vlm(tiny_model(family))
    assert fam == family
    samples = _samples()
    batch = encode_batch(processor, family, samples)
    suffix = FAMILIES[family].answer_suffix
    for row, s in enumerate(samples):
        kept = batch["labels"][row] != IGNORE_INDEX
        assert processor.tokenizer.decode(batch["input_ids"][row][kept]) == s.target + suffix
        # The answer is the last run of real tokens: nothing after it but padding.
        last = int(batch["attention_mask"][row].nonzero().max())
        assert bool(kept[last]) and kept.nonzero().min() > 0
    out = model(**batch)
    assert out.loss.isfinite() and out.loss.item() > 0
