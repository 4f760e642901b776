"""Synthetic generators: deterministic by seed, with the shared emotion → colour signal."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from emomerge.merging.errors import InputError
from emomerge.training.data import read_dataset
from emomerge.training.data.synthetic import COLOURS, EMOTION_COLOUR, write_synthetic

NAMES = ["emocomics35", "emoart", "emid", "mangavqa"]


def _digest(root) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(tmp_path, name):
    a = write_synthetic(name, tmp_path / "a", n=8, seed=5)
    b = write_synthetic(name, tmp_path / "b", n=8, seed=5)
    c = write_synthetic(name, tmp_path / "c", n=8, seed=6)
    assert _digest(a) == _digest(b) != _digest(c)


def _dominant_colour(img: Image.Image) -> str:
    px = img.convert("RGB").getpixel((img.width // 2, img.height // 2))
    return min(COLOURS, key=lambda c: sum((x - y) ** 2 for x, y in zip(px, COLOURS[c])))


@pytest.mark.parametrize(
    "name,task", [("emoart", None), ("emid", "image_emotion"), ("emocomics35", "page")]
)
def test_image_colour_encodes_the_emotion(synthetic, name, task):
    samples = read_dataset(name, synthetic[name], "train", task=task)
    for s in samples:
        with Image.open(s.images[0]) as img:
            # Page images show the first utterance's first emotion.
            label = s.meta["utterance_labels"][0][0] if task == "page" else s.target
            assert _dominant_colour(img) == EMOTION_COLOUR[label.lower()]


def test_mangavqa_answers_describe_the_image(synthetic):
    from emomerge.training.data.synthetic import COLOUR_JA

    for s in read_dataset("mangavqa", synthetic["mangavqa"], "train"):
        if "何色" in s.prompt_text:
            with Image.open(s.images[0]) as img:
                assert COLOUR_JA[_dominant_colour(img)] == s.target


def test_bad_arguments():
    with pytest.raises(InputError, match="no synthetic writer"):
        write_synthetic("coco", "/nonexistent")
    with pytest.raises(InputError, match="at least 4"):
        write_synthetic("emoart", "/nonexistent", n=1)
