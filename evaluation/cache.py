"""Per-variant prediction cache: JSONL lines keyed by (variant hash, split hash, sample id).

Records are appended and flushed batch by batch, so an evaluation killed at any point keeps
everything up to its last finished batch; the re-run with the same command reads the file and
scores only what is missing. A line cut short by the kill is not valid JSON and is skipped.
What is cached is the raw model output (label log-probabilities, or the generated text), never a
decision, so changing a threshold or the length normalisation reuses the cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


class PredictionCache:
    """The cached raw outputs of one variant (all splits), backed by JSONL files.

    One file, or with ``part`` (data-parallel evaluation, :mod:`.distributed`) this process's
    part ``<variant>.<hash>.part<k>.jsonl``; reading takes the one file and every part, so any
    number of processes resumes from what all of them wrote.
    """

    def __init__(
        self, folder: str | Path, variant_name: str, variant_hash: str, part: int | None = None
    ) -> None:
        self.variant_hash = variant_hash
        stem = f"{_safe(variant_name)}.{variant_hash[:12]}"
        base = Path(folder) / f"{stem}.jsonl"
        self.path = base if part is None else Path(folder) / f"{stem}.part{part}.jsonl"
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        #: a kill mid-line leaves no final newline: the next append must start a fresh line
        self._torn = False
        if self.path.exists():
            with self.path.open("rb") as fb:
                fb.seek(0, 2)
                if fb.tell():
                    fb.seek(-1, 2)
                    self._torn = fb.read(1) != b"\n"
        parts = sorted(Path(folder).glob(f"{glob.escape(stem)}.part*.jsonl"))
        for path in [base, *parts] if base.exists() else parts:
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if rec.get("variant") == variant_hash:
                        self._records[(rec["split"], rec["id"])] = rec

    def get(self, split_hash: str, sample_id: str) -> dict[str, Any] | None:
        """The cached record of one sample, or None."""
        return self._records.get((split_hash, sample_id))

    def missing(self, split_hash: str, ids: Iterable[str]) -> list[str]:
        """The ids without a cached record, in the given order."""
        return [i for i in ids if (split_hash, i) not in self._records]

    def add(self, split_hash: str, records: list[dict[str, Any]]) -> None:
        """Append records (each with an ``id``) and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            if self._torn:
                fh.write("\n")
                self._torn = False
            for rec in records:
                rec = {"variant": self.variant_hash, "split": split_hash, **rec}
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self._records[(split_hash, rec["id"])] = rec
            fh.flush()

    def __len__(self) -> int:
        return len(self._records)


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (sorted keys), for config and identity hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
