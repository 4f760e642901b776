"""Metric names live in one place, evaluation/metrics.py's METRICS: the leaderboard's columns,
the report's tables, the headline / McNemar choices and the replicate statistics all name
metrics that exist there, and no other module keeps a list of its own."""

from __future__ import annotations

import ast
from pathlib import Path

from emomerge.evaluation import bootstrap, leaderboard, runner, sufficient
from emomerge.evaluation.metrics import CORRECTNESS, HEADLINE, METRICS, REPORTED, TASKS
from emomerge.experiment import report as experiment_report

ROOT = Path(__file__).resolve().parents[2]


def test_every_metric_is_a_leaderboard_column():
    assert leaderboard.METRIC_COLUMNS == tuple(METRICS)
    for name in METRICS:
        for suffix in ("", "_lo", "_hi", "_p", "_p_holm"):
            assert f"{name}{suffix}" in leaderboard.COLUMNS, name
    # the holm columns arrived later: still read from old leaderboards
    assert {f"{m}_p_holm" for m in METRICS} <= set(leaderboard.LATER_COLUMNS)


def test_every_name_the_report_and_runner_use_is_a_metric():
    assert set(REPORTED) == set(HEADLINE) == set(CORRECTNESS) == set(TASKS)
    for task in TASKS:
        assert set(REPORTED[task]) <= set(HEADLINE[task]), task  # reported ⇒ scored
        assert CORRECTNESS[task] in HEADLINE[task]
    for task, metrics in experiment_report.TABLE_METRICS.items():
        assert [m for m, _ in metrics] == list(REPORTED[task])
        assert [h for _, h in metrics] == [METRICS[m].label for m in REPORTED[task]]
    assert experiment_report.headline("multi") == ("macro_f1", "macro-F1")
    assert experiment_report.headline("vqa") == ("char_f1", "char-F1")
    assert runner.MCNEMAR_METRIC == CORRECTNESS
    # the replicate statistics implement every metric, no more
    assert set(sufficient.STATS) == set(METRICS)
    assert bootstrap.METRICS is METRICS


def _metric_literals(path: Path) -> list[tuple[int, list[str]]]:
    """Collection literals (tuple, list, set, dict keys) naming two or more metrics."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        names = [
            e.value
            for e in items
            if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in METRICS
        ]
        if len(names) >= 2:
            found.append((node.lineno, names))
    return found


def test_no_other_module_lists_metric_names():
    # metrics.py declares them; sufficient.py keys its per-metric statistics by them (checked
    # equal to METRICS above)
    allowed = {ROOT / "evaluation" / "metrics.py", ROOT / "evaluation" / "sufficient.py"}
    offenders = {}
    for folder in ("evaluation", "experiment", "emomerge", "merging", "training"):
        for path in sorted((ROOT / folder).rglob("*.py")):  # (no folder: nothing to scan)
            if path not in allowed and (hits := _metric_literals(path)):
                offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}
    # the scan finds what it looks for
    assert _metric_literals(ROOT / "evaluation" / "metrics.py")
