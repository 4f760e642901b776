"""EmoComics35 reader: one CSV row per comic page, utterance-aligned list columns.

Quirk of the published file: ``PageEmotions`` is a list of *stringified* lists and some entries
are unquoted (``[Neutral]`` instead of ``['Neutral']``), so a plain ``ast.literal_eval`` of each
entry fails. We parse with ``literal_eval`` first and fall back to a bracket/comma split, counting
every repair so ``emomerge data inspect`` can show it.
"""

from __future__ import annotations

import ast
import csv
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emomerge.merging.errors import InputError

from .sample import ImageResolver, ReadReport, Sample, normalize_split, user_message

LABELS = ["Anger", "Disgust", "Fear", "Joy", "Neutral", "Sadness", "Surprise"]
COLUMNS = [
    "SourceFile",
    "Page",
    "PageUtterances",
    "PageSpeakers",
    "PageEmotions",
    "PagePanels",
    "PageBalloons",
    "FileNr",
    "Split",
    "ComicBookTitle",
    "image_path",
]
LIST_COLUMNS = ["PageUtterances", "PageSpeakers", "PageEmotions", "PagePanels", "PageBalloons"]
TASKS = ("utterance", "page")
_CANON = {lab.lower(): lab for lab in LABELS}


def find_csv(path: Path) -> Path:
    """The annotation CSV: ``path`` itself or the single ``*.csv`` in the folder."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.csv"))
    if len(found) != 1:
        raise InputError(f"{path}: expected one EmoComics35 CSV file, found {len(found)}")
    return found[0]


def parse_label_entry(entry: Any, repairs: Counter, where: str) -> list[str]:
    """Labels of one utterance from ``"['Fear', 'Sadness']"``, ``"[Neutral]"`` or a list."""
    if isinstance(entry, str):
        try:
            value = ast.literal_eval(entry)
        except (ValueError, SyntaxError):
            # Unquoted names: split the bracket body on commas ourselves.
            body = entry.strip().removeprefix("[").removesuffix("]")
            value = [tok.strip().strip("'\"") for tok in body.split(",") if tok.strip()]
            repairs["unquoted_label_list"] += 1
    else:
        value = entry
    if isinstance(value, str):
        value = [value]
        repairs["bare_label_string"] += 1
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: expected a list of emotion labels, got {value!r}")
    out: list[str] = []
    for raw in value:
        lab = _CANON.get(str(raw).strip().lower())
        if lab is None:
            raise InputError(f"{where}: unknown emotion label {raw!r} (expected one of {LABELS})")
        if lab != raw:
            repairs["label_case_or_space"] += 1
        if lab not in out:
            out.append(lab)
    if not out:
        raise InputError(f"{where}: utterance with no emotion label")
    return out


def _cell(row: dict[str, Any], column: str, where: str) -> str:
    """A CSV cell; a row shorter than the header leaves ``None`` in its last columns."""
    value = row.get(column)
    if value is None:
        raise InputError(f"{where}: no value in column {column} (row shorter than the header)")
    return value


def _int_cell(row: dict[str, Any], column: str, where: str) -> int:
    value = _cell(row, column, where)
    try:
        return int(value)
    except ValueError as exc:
        raise InputError(f"{where}: column {column} is not an integer ({value!r})") from exc


def _literal_list(text: str | None, where: str) -> list[Any]:
    if text is None:
        raise InputError(f"{where}: no value (row shorter than the header)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise InputError(f"{where}: not a list literal ({exc.__class__.__name__})") from exc
    if not isinstance(value, list):
        raise InputError(f"{where}: expected a list, got {type(value).__name__}")
    return value


@contextmanager
def _open_csv(csv_path: Path) -> Iterator[Iterator[tuple[int, dict[str, Any]]]]:
    """(line number, row) pairs, header checked; decoding and CSV errors name the line."""
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)

        def rows() -> Iterator[tuple[int, dict[str, Any]]]:
            try:
                missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise InputError(f"{csv_path}: missing columns {missing}")
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{csv_path}: not a UTF-8 text file (near line {reader.line_num + 1})"
                ) from exc
            except csv.Error as exc:
                raise InputError(f"{csv_path}:{reader.line_num}: not valid CSV ({exc})") from exc

        yield rows()


def iter_pages(csv_path: Path) -> Iterator[dict[str, Any]]:
    """Parsed pages of the whole file (all splits), utterance lists aligned and validated.

    Each page carries the ``repairs`` its parsing needed, so a split's report counts its own.
    """
    with _open_csv(csv_path) as rows:
        for lineno, row in rows:
            where = f"{csv_path}:{lineno}"
            lists = {c: _literal_list(row[c], f"{where} column {c}") for c in LIST_COLUMNS}
            lengths = {c: len(v) for c, v in lists.items()}
            if len(set(lengths.values())) != 1:
                raise InputError(f"{where}: list columns not aligned per utterance {lengths}")
            repairs: Counter = Counter()
            emotions = [
                parse_label_entry(e, repairs, f"{where} PageEmotions[{i}]")
                for i, e in enumerate(lists["PageEmotions"])
            ]
            yield {
                "file_nr": _int_cell(row, "FileNr", where),
                "page": _int_cell(row, "Page", where),
                "split": _cell(row, "Split", where).strip(),
                "title": _cell(row, "ComicBookTitle", where),
                "annotated_path": _cell(row, "image_path", where),
                "utterances": [str(u).strip() for u in lists["PageUtterances"]],
                "speakers": [str(s) for s in lists["PageSpeakers"]],
                "panels": lists["PagePanels"],
                "balloons": lists["PageBalloons"],
                "emotions": emotions,
                "repairs": repairs,
            }


def image_candidates(root: Path, file_nr: int, page: int) -> list[Path]:
    """Where a page image may sit under the user's root (the annotators' layout first)."""
    book, name = f"{file_nr:06d}", f"page{page:05d}.jpg"
    return [
        root / "images" / book / "images" / name,
        root / book / "images" / name,
        root / book / name,
    ]


def _utterance_prompt(pg: dict[str, Any], i: int) -> str:
    return (
        f"This comic page contains the following utterance, spoken by {pg['speakers'][i]} "
        f"(panel {pg['panels'][i]}, balloon {pg['balloons'][i]}):\n"
        f'"{pg["utterances"][i]}"\n'
        f"Which emotions does the speaker express? Choose one or more of: {', '.join(LABELS)}. "
        "Answer with the labels separated by commas."
    )


def _page_prompt(pg: dict[str, Any]) -> str:
    lines = [
        f"{i + 1}. [{s}] {u}" for i, (s, u) in enumerate(zip(pg["speakers"], pg["utterances"]))
    ]
    return (
        "These are the utterances on this comic page, in reading order:\n"
        + "\n".join(lines)
        + f"\nFor each utterance, give the emotions of its speaker among: {', '.join(LABELS)}. "
        'Answer in JSON: [{"utterance": 1, "emotions": ["..."]}, ...].'
    )


def label_text(labels: list[str]) -> str:
    """Labels in the canonical order, comma-separated (the utterance task's target)."""
    return ", ".join(sorted(labels, key=LABELS.index))


def read_emocomics35(
    path: Path,
    split: str,
    task: str | None = None,
    *,
    image_root: str | Path | None = None,
    allow_missing_images: bool = False,
    **_: Any,
) -> tuple[list[Sample], ReadReport]:
    """Read one split (``train``/``test``, the file's ``Split`` column) at utterance or page level."""
    task = task or "utterance"
    if task not in TASKS:
        raise InputError(f"emocomics35: unknown task '{task}' (expected one of {list(TASKS)})")
    csv_path = find_csv(path)
    root = Path(image_root) if image_root else csv_path.parent
    pages = list(iter_pages(csv_path))
    wanted = normalize_split(split, sorted({p["split"] for p in pages}), csv_path)
    report = ReadReport("emocomics35", wanted)
    images = ImageResolver(report, allow_missing_images, root)
    samples: list[Sample] = []
    n_pages = n_utts = 0
    for pg in (p for p in pages if p["split"] == wanted):
        n_pages += 1
        n_utts += len(pg["utterances"])
        report.repairs.update(pg["repairs"])
        for labs in pg["emotions"]:
            report.label_counts.update(labs)
            report.labels_per_item[len(labs)] += 1
        img = images.resolve(image_candidates(root, pg["file_nr"], pg["page"]))
        if img is None:
            continue
        page_id = f"{pg['file_nr']:06d}-p{pg['page']:05d}"
        meta = {"title": pg["title"], "file_nr": pg["file_nr"], "page": pg["page"]}
        if task == "page":
            target = json.dumps(
                [
                    {"utterance": i + 1, "emotions": sorted(e, key=LABELS.index)}
                    for i, e in enumerate(pg["emotions"])
                ],
                ensure_ascii=False,
            )
            union = sorted({lab for e in pg["emotions"] for lab in e}, key=LABELS.index)
            samples.append(
                Sample(
                    id=page_id,
                    images=[img],
                    messages=user_message(1, _page_prompt(pg)),
                    target=target,
                    labels=union,
                    label_set=list(LABELS),
                    group=page_id,
                    meta={
                        **meta,
                        "utterance_labels": pg["emotions"],
                        "utterances": pg["utterances"],
                    },
                )
            )
            continue
        for i, labs in enumerate(pg["emotions"]):
            samples.append(
                Sample(
                    id=f"{page_id}-u{i:03d}",
                    images=[img],
                    messages=user_message(1, _utterance_prompt(pg, i)),
                    target=label_text(labs),
                    labels=list(labs),
                    label_set=list(LABELS),
                    group=page_id,
                    meta={**meta, "utterance_index": i, "speaker": pg["speakers"][i]},
                )
            )
    images.warn_if_dropped()
    report.samples = len(samples)
    report.extra.update(pages=n_pages, utterances=n_utts)
    return samples, report


def list_splits(path: Path) -> list[str]:
    """Split names present in the file (``TRAIN``/``TEST`` in the published CSV)."""
    csv_path = find_csv(path)
    with _open_csv(csv_path) as rows:
        return sorted({_cell(row, "Split", f"{csv_path}:{lineno}").strip() for lineno, row in rows})
