"""Small synthetic datasets written in each dataset's *published* format, so tests run the readers.

The learnable signal is shared across the four domains: every emotion maps to a colour family
(anger → red, joy → yellow, sadness → blue, fear → purple, ...), drawn as a filled shape whose
form identifies the label within its dataset; utterances contain emotion words; MangaVQA asks in
Japanese about the colour and shape on the page. Deterministic by seed.
"""

from __future__ import annotations

import io
import json
import random
import wave
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from emomerge.merging.errors import InputError

from . import emid as emid_mod
from . import emoart as emoart_mod
from . import emocomics35 as ec_mod

COLOURS = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 30),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "green": (40, 170, 60),
    "teal": (30, 170, 170),
    "grey": (120, 120, 120),
}
COLOUR_JA = {
    "red": "赤",
    "yellow": "黄色",
    "blue": "青",
    "purple": "紫",
    "orange": "オレンジ",
    "green": "緑",
    "teal": "水色",
    "grey": "灰色",
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SHAPE_JA = {"circle": "丸", "square": "四角", "triangle": "三角", "diamond": "ひし形"}
#: The cross-domain emotion → colour family mapping (the shared learnable signal).
EMOTION_COLOUR = {
    "anger": "red",
    "annoyed": "red",
    "frustrated": "red",
    "joy": "yellow",
    "happy": "yellow",
    "glad": "yellow",
    "amusement": "yellow",
    "sadness": "blue",
    "sad": "blue",
    "fear": "purple",
    "alarmed": "purple",
    "surprise": "orange",
    "excited": "orange",
    "aroused": "orange",
    "excitement": "orange",
    "awe": "orange",
    "disgust": "green",
    "calm": "teal",
    "contentment": "teal",
    "neutral": "grey",
    "bored": "grey",
    "tired": "grey",
}
UTTERANCE_WORDS = {
    "Anger": "I am so angry at you!",
    "Disgust": "Ugh, that is disgusting.",
    "Fear": "I am scared, help me!",
    "Joy": "Ha ha, what a happy day!",
    "Neutral": "The meeting is at noon.",
    "Sadness": "I feel so sad and alone.",
    "Surprise": "What?! I cannot believe it!",
}
SIZE = 64


def draw(colour: str, shape: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """A light background with one filled shape; position jitter keeps images distinct."""
    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    c, r = size // 2 + rng.randint(-6, 6), size // 3
    x, y = c, size // 2 + rng.randint(-6, 6)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return img


def emotion_image(label: str, labels: list[str], rng: random.Random) -> Image.Image:
    """The image of ``label``: its colour family, and a shape fixed by its index in ``labels``."""
    return draw(EMOTION_COLOUR[label.lower()], SHAPES[labels.index(label) % len(SHAPES)], rng)


def _save_jpg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _wav_bytes(rng: random.Random, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(bytes(rng.randrange(256) for _ in range(rate // 50)))
    return buf.getvalue()


def write_emocomics35(root: Path, n: int, rng: random.Random) -> Path:
    """``n`` pages over four books (three TRAIN, one TEST) in the annotation CSV format."""
    labels = ec_mod.LABELS
    books = [
        (1000 + 7 * b, "TRAIN" if b < 3 else "TEST", f"Synthetic Comic #{b + 1}") for b in range(4)
    ]
    rows = []
    for i in range(n):
        file_nr, split, title = books[i % 4]
        page = i // 4 + 1
        k = rng.randint(1, 4)
        emos = []
        for _ in range(k):
            first = rng.choice(labels)
            second = rng.choice(labels) if rng.random() < 0.3 else None
            emos.append([first] + ([second] if second and second != first else []))
        utts = [UTTERANCE_WORDS[e[0]] for e in emos]
        speakers = [rng.choice(["ALICE", "BOB", "ID-1"]) for _ in emos]
        # The published file writes Neutral unquoted ("[Neutral]"); reproduce the quirk.
        emo_col = ["[Neutral]" if e == ["Neutral"] else str(e) for e in emos]
        _save_jpg(
            emotion_image(emos[0][0], labels, rng),
            root / "images" / f"{file_nr:06d}" / "images" / f"page{page:05d}.jpg",
        )
        rows.append(
            {
                "SourceFile": f"QC copy - {file_nr} - synthetic.xlsx",
                "Page": page,
                "PageUtterances": str(utts),
                "PageSpeakers": str(speakers),
                "PageEmotions": str(emo_col),
                "PagePanels": str([j + 1 for j in range(k)]),
                "PageBalloons": str([1] * k),
                "FileNr": file_nr,
                "Split": split,
                "ComicBookTitle": title,
                "image_path": f"/Utilisateurs/annotator/EmoComics35/raw_files/images/{file_nr:06d}"
                f"/images/page{page:05d}.jpg",
            }
        )
    import csv

    path = root / "emocomics35_pg_images_original.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["", *ec_mod.COLUMNS])
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({"": i, **row})
    return root


_VALENCE = {
    "Calm": "positive",
    "Excited": "positive",
    "Contentment": "positive",
    "Happy": "positive",
    "Glad": "positive",
    "Aroused": "positive",
}
_AROUSAL = {"Excited", "Aroused", "Alarmed", "Frustrated", "Annoyed", "Happy"}


def write_emoart(root: Path, n: int, rng: random.Random) -> Path:
    """``Annotation.json`` with ``n`` records and Windows-style ``Images\\Style\\file.jpg`` paths."""
    labels = emoart_mod.LABELS
    records = []
    for i in range(n):
        emo = labels[i % len(labels)] if i < len(labels) else rng.choice(labels)
        style = rng.choice(["Cubism", "Impressionism", "Ukiyo_e"])
        rel = f"Images\\{style}\\art_{i:05d}.jpg"
        _save_jpg(emotion_image(emo, labels, rng), root / "Images" / style / f"art_{i:05d}.jpg")
        records.append(
            {
                "request_id": f"req-{rng.getrandbits(48):012x}",
                "image_path": rel,
                "description": {
                    "first_section": {"description": f"A {EMOTION_COLOUR[emo.lower()]} shape."},
                    "second_section": {
                        "visual_attributes": {
                            "brushstroke": "smooth",
                            "color": "saturated",
                            "composition": "centred",
                            "light_and_shadow": "flat",
                            "line_quality": "clean",
                        },
                        "emotional_impact": f"The work feels {emo.lower()}.",
                    },
                    "third_section": {
                        "emotional_arousal_level": "high" if emo in _AROUSAL else "low",
                        "emotional_valence": _VALENCE.get(emo, "negative"),
                        "dominant_emotion": emo,
                        "healing_effects": "None noted.",
                    },
                },
            }
        )
    (root / "Annotation.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return root


_IMG_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_QUESTIONS = [
    "Does the emotion of this music match the image?",
    "Do the music and the picture express the same emotion?",
]


def _distinct_input(
    emo: str, labels: list[str], rng: random.Random, seen: set[tuple[bytes, str]]
) -> tuple[bytes, str]:
    """An (image, question) pair not drawn before in either split.

    The jitter leaves ~340 distinct inputs per emotion, so a few hundred rows repeat some; a
    repeat across train and test is an overlap the curriculum rightly refuses. Redrawing only on
    a repeat leaves the files of smaller sets as they were.
    """
    for _ in range(100):
        pair = (_jpeg_bytes(emotion_image(emo, labels, rng)), rng.choice(_QUESTIONS))
        if pair not in seen:
            break
    seen.add(pair)
    return pair


def write_emid(root: Path, n: int, rng: random.Random) -> Path:
    """Emotion-matching parquet shards (train/test) plus the original ``EMID_data.csv`` layout."""
    labels = emid_mod.LABELS
    seen: set[tuple[bytes, str]] = set()
    for split, count in (("train", n), ("test", max(2, n // 3))):
        cols: dict[str, list[Any]] = {
            k: []
            for k in ("audio", "sampling_rate", "image", "same", "emotion", "question", "answer")
        }
        for i in range(count):
            emo, same = rng.choice(labels), rng.random() < 0.5
            cols["audio"].append({"bytes": _wav_bytes(rng), "path": f"clip_{i}.wav"})
            cols["sampling_rate"].append(16000)
            image, question = _distinct_input(emo, labels, rng, seen)
            cols["image"].append({"bytes": image, "path": f"{emo}_{i}.jpg"})
            cols["same"].append(same)
            cols["emotion"].append(emo if same else "")
            cols["question"].append(question)
            cols["answer"].append(f"yes - {emo}" if same else "no")
        table = pa.table(
            {
                **cols,
                "audio": pa.array(cols["audio"], _IMG_STRUCT),
                "image": pa.array(cols["image"], _IMG_STRUCT),
                "sampling_rate": pa.array(cols["sampling_rate"], pa.int32()),
            }
        )
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    header = ["Audio_Filename", "genre", "feeling", "emotion"]
    for k in (1, 2, 3):
        header += [f"Image{k}_filename", f"Image{k}_tag", f"Image{k}_text"]
    header.append("is_original_clip")
    import csv

    with (root / "EMID_data.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(n):
            emo = labels[i % len(labels)]
            row = [f"clip_{i:04d}.wav", "pop", "calm", emo]
            for k in (1, 2, 3):
                name = f"{emo}_{i:04d}_{k}.jpg"
                _save_jpg(emotion_image(emo, labels, rng), root / "images" / name)
                row += [name, emo, f"a picture evoking {emo}"]
            w.writerow(row + [i % 2 == 0])
    return root


def write_mangavqa(root: Path, n: int, rng: random.Random) -> Path:
    """Manga109-style page images and train/test parquet with Japanese questions."""
    titles = ["SyntheticManga", "TestTitle"]
    for split, title, type_col in (
        ("train", titles[0], "answer_type"),
        ("test", titles[1], "understanding_type"),
    ):
        count = n if split == "train" else max(2, n // 3)
        cols: dict[str, list[Any]] = {
            k: []
            for k in (
                "title",
                "image_number",
                "question",
                "answer",
                "required_info",
                "w5h1",
                type_col,
            )
        }
        for i in range(count):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            _save_jpg(draw(colour, shape, rng), root / "images" / title / f"{i:03d}.jpg")
            ask_colour = rng.random() < 0.5
            cols["title"].append(title)
            cols["image_number"].append(i)
            cols["question"].append(
                "このページの図形は何色ですか？"
                if ask_colour
                else "このページの図形はどんな形ですか？"
            )
            cols["answer"].append(COLOUR_JA[colour] if ask_colour else SHAPE_JA[shape])
            cols["required_info"].append("画像")
            cols["w5h1"].append("what")
            cols[type_col].append("exact_extraction" if ask_colour else "understanding")
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


WRITERS = {
    "emocomics35": write_emocomics35,
    "emoart": write_emoart,
    "emid": write_emid,
    "mangavqa": write_mangavqa,
}


def write_synthetic(name: str, root: str | Path, n: int = 24, seed: int = 0) -> Path:
    """Write a synthetic ``name`` dataset of about ``n`` items under ``root``; return the path
    to pass to :func:`emomerge.training.data.read_dataset`."""
    if name not in WRITERS:
        raise InputError(f"no synthetic writer for '{name}' (expected one of {sorted(WRITERS)})")
    if n < 4:
        raise InputError(f"synthetic {name}: n must be at least 4 (got {n})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](root, n, random.Random(seed))
