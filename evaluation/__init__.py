"""emomerge.evaluation: score the base, stage adapters and merges; leaderboards with intervals.

The public entry points (imported lazily, so ``leaderboard show`` does not pay for torch):

- :func:`evaluate_paths` (pipeline): paths in, leaderboard rows out — what ``emomerge evaluate``
  and the experiment runner call.
- :func:`evaluate` (runner) with :class:`EvalConfig`, :class:`ModelHost` and
  :func:`discover`: the same with an already loaded base and already read samples.
- :func:`leave_one_stage_out` (ablation), :func:`upsert_rows` / :func:`show` / :func:`compare`
  (leaderboard). The figures and report tables over leaderboards are the experiment layer's
  (``emomerge.experiment.plots``, ``emomerge.experiment.report``; DESIGN.md, Layers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_paths": "pipeline",
    "load_split": "pipeline",
    "evaluate": "runner",
    "EvalConfig": "runner",
    "EvalResult": "runner",
    "ModelHost": "predict",
    "discover": "variants",
    "variant_from_dir": "variants",
    "Variant": "variants",
    "leave_one_stage_out": "ablation",
    "holdout_by_book": "holdout",
    "upsert_rows": "leaderboard",
    "read_rows": "leaderboard",
    "show": "leaderboard",
    "compare": "leaderboard",
    "COLUMNS": "leaderboard",
    "parse_labels": "parsing",
    "parse_page": "parsing",
    "Predictions": "metrics",
    "compute": "metrics",
    "bootstrap": "bootstrap",
    "paired_bootstrap": "bootstrap",
    "mcnemar": "bootstrap",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emomerge.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
