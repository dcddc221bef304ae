"""Vision-critical heads from MME head-ablation scores: drops, selection, heads.json/.parquet.

Pure functions on plain score dicts (no torch, no model code), so the selection rule and the
file contract (docs/FORMATS.md, "heads run") can be tested on hand-built numbers. A score dict
is `{"total", "perception", "cognition", "subtasks": {category: {"acc", "acc_plus", "score"}}}`
as `scores_dict` builds it from `vlmcredit.data.mme_score.MMEScores`.

Selection (the KAWHI protocol): ablate a configuration, re-score MME, drop = baseline - ablated;
a configuration is vision-critical when its drop on the chosen metric exceeds the threshold
(default 100 on the total). Drops are compared at 1e-6 resolution, so float noise in a drop that
is exactly the threshold (e.g. 100.00000000000001) does not make a head critical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmcredit.data.mme import CATEGORIES, PERCEPTION
from vlmcredit.errors import VlmCreditError

METRICS = ("total", "perception")
GROUPS = ("total", "perception", "cognition")
MODES = ("head-index", "layer-head")
ABLATIONS = ("zero", "mean")
ANSWERING = ("logits", "generate")
HEADS_JSON = "heads.json"
HEADS_PARQUET = "heads.parquet"
SUBTASK_MAX = 200.0  # 100 * (acc + acc+), each at most 1
DROP_DECIMALS = 6  # resolution of the threshold comparison


def scores_dict(scores: Any) -> dict[str, Any]:
    """An `MMEScores` (or anything with its fields) as the score dict heads.json stores."""
    return {
        "total": float(scores.total),
        "perception": float(scores.perception),
        "cognition": float(scores.cognition),
        "subtasks": {
            cat: {"acc": float(s.acc), "acc_plus": float(s.acc_plus), "score": float(s.score)}
            for cat, s in scores.subtasks.items()
        },
    }


def score_drops(baseline: Mapping[str, Any], ablated: Mapping[str, Any]) -> dict[str, float]:
    """baseline - ablated for total, perception and cognition (positive = ablation hurt)."""
    return {g: float(baseline[g]) - float(ablated[g]) for g in GROUPS}


def max_score(metric: str, categories: Sequence[str]) -> float:
    """The highest score `metric` can reach on `categories` (200 per subtask it sums)."""
    check_metric(metric)
    group = set(PERCEPTION) if metric == "perception" else set(CATEGORIES)
    return SUBTASK_MAX * sum(c in group for c in categories)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise VlmCreditError(f"--metric {metric}: choose one of {', '.join(METRICS)}")


def check_threshold(threshold: float, metric: str, categories: Sequence[str] | None = None) -> None:
    """A threshold some drop can exceed: >= 0 and below the metric's maximum on `categories`."""
    check_metric(metric)
    if not math.isfinite(threshold) or threshold < 0:
        raise VlmCreditError(
            f"--threshold {threshold}: must be a finite number >= 0 (a drop in MME score points)"
        )
    if categories is None:
        return
    top = max_score(metric, categories)
    if top == 0:
        raise VlmCreditError(
            f"--metric {metric}: none of the categories scored ({', '.join(categories)}) belongs "
            "to it; use --metric total or add perception categories"
        )
    if threshold >= top:
        scored = f"{len(categories)} {'category' if len(categories) == 1 else 'categories'}"
        raise VlmCreditError(
            f"--threshold {threshold:g}: no drop can exceed it, the {metric} score of {scored} "
            f"is at most {top:g}; choose a smaller threshold"
        )


def is_critical(drop: Mapping[str, float], metric: str, threshold: float) -> bool:
    """drop[metric] > threshold, compared at 1e-6 resolution."""
    return round(float(drop[metric]), DROP_DECIMALS) > threshold


def select_critical(
    drops: Sequence[Mapping[str, float]], metric: str = "total", threshold: float = 100.0
) -> list[bool]:
    """For each configuration's drops, whether it is vision-critical."""
    check_threshold(threshold, metric)
    return [is_critical(d, metric, threshold) for d in drops]


def critical_head_indices(critical: Sequence[Mapping[str, Any]]) -> list[int]:
    """Sorted unique head indices of the critical configurations (layer ignored)."""
    return sorted({int(c["head"]) for c in critical})


def build_heads_report(
    *,
    checkpoint: Mapping[str, Any],
    mode: str,
    ablation: str,
    answering: str,
    metric: str,
    threshold: float,
    num_questions: int,
    categories: Sequence[str],
    baseline: Mapping[str, Any],
    results: Sequence[tuple[int | None, int, Mapping[str, Any]]],
) -> dict[str, Any]:
    """The heads.json object (docs/FORMATS.md) from the baseline and each (layer, head, scores).

    `layer` None means the head index was ablated in every layer at once (head-index mode).
    """
    _check_choice("mode", mode, MODES)
    _check_choice("ablation", ablation, ABLATIONS)
    _check_choice("answering", answering, ANSWERING)
    check_threshold(threshold, metric)
    heads = []
    for layer, head, scores in results:
        drop = score_drops(baseline, scores)
        heads.append(
            {
                "layer": None if layer is None else int(layer),
                "head": int(head),
                "scores": {g: float(scores[g]) for g in GROUPS},
                "drop": drop,
                "subtasks": {c: float(s["score"]) for c, s in scores["subtasks"].items()},
                "critical": is_critical(drop, metric, threshold),
            }
        )
    critical = [{"layer": h["layer"], "head": h["head"]} for h in heads if h["critical"]]
    return {
        "checkpoint": dict(checkpoint),
        "mode": mode,
        "ablation": ablation,
        "answering": answering,
        "metric": metric,
        "threshold": float(threshold),
        "num_questions": int(num_questions),
        "categories": list(categories),
        "baseline": {
            **{g: float(baseline[g]) for g in GROUPS},
            "subtasks": {
                c: {k: float(s[k]) for k in ("acc", "acc_plus", "score")}
                for c, s in baseline["subtasks"].items()
            },
        },
        "heads": heads,
        "critical": critical,
        "critical_heads": critical_head_indices(critical),
    }


def heads_table(report: Mapping[str, Any]) -> Any:
    """heads.parquet as a DataFrame: one row per configuration (layer -1 = every layer)."""
    import numpy as np
    import pandas as pd

    categories = list(report["categories"])
    rows = report["heads"]
    columns: dict[str, Any] = {
        "layer": np.array([-1 if h["layer"] is None else h["layer"] for h in rows], np.int32),
        "head": np.array([h["head"] for h in rows], np.int32),
    }
    for g in GROUPS:
        columns[g] = np.array([h["scores"][g] for h in rows], np.float64)
    for g in GROUPS:
        columns[f"drop_{g}"] = np.array([h["drop"][g] for h in rows], np.float64)
    columns["critical"] = np.array([h["critical"] for h in rows], bool)
    for c in categories:
        columns[f"score_{c}"] = np.array([h["subtasks"].get(c, np.nan) for h in rows], np.float64)
    return pd.DataFrame(columns)


def write_heads(run_dir: Path, report: Mapping[str, Any]) -> None:
    """Write heads.json and heads.parquet into a run folder (atomically)."""
    from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet

    atomic_write_parquet(run_dir / HEADS_PARQUET, heads_table(report))
    atomic_write_json(run_dir / HEADS_JSON, report)


def read_heads(path: str | Path) -> dict[str, Any]:
    """Read and validate heads.json from a run folder or the file itself.

    A probe-heads heads.json is checked in full (its critical list must match the heads marked
    critical). A hand-written file may hold only `critical` ([{"layer": null | int, "head":
    int}]) or only `critical_heads` ([int], meaning each head in every layer), e.g. the heads a
    paper lists; the missing one of the two is filled in.
    """
    file = Path(path)
    if file.is_dir():
        file = file / HEADS_JSON
    if not file.is_file():
        raise VlmCreditError(
            f"{path}: no {HEADS_JSON} there; pass a finished probe-heads run folder or its "
            "heads.json"
        )
    try:
        report = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"{file}: not valid JSON ({exc})") from None
    problem = _heads_problem(report)
    if problem:
        raise VlmCreditError(
            f"{file}: not a usable heads.json ({problem}); rerun vlmcredit probe-heads "
            'or write {"critical_heads": [0, 1, ...]}'
        )
    if "critical" not in report:
        report["critical"] = [{"layer": None, "head": h} for h in report["critical_heads"]]
    report["critical_heads"] = critical_head_indices(report["critical"])
    return report


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _heads_problem(report: Any) -> str | None:
    """What is wrong with a parsed heads.json, or None."""
    if not isinstance(report, dict):
        return "top level is not an object"
    if "critical" not in report and "critical_heads" not in report:
        return "neither critical nor critical_heads"
    if "critical" in report:
        critical = report["critical"]
        if not isinstance(critical, list) or not all(
            isinstance(c, dict)
            and _is_index(c.get("head"))
            and (c.get("layer") is None or _is_index(c.get("layer")))
            for c in critical
        ):
            return "critical must be a list of {layer: null or index, head: index}"
    elif not isinstance(report["critical_heads"], list) or not all(
        _is_index(h) for h in report["critical_heads"]
    ):
        return "critical_heads must be a list of head indices"
    if {"critical", "critical_heads"} <= report.keys() and report[
        "critical_heads"
    ] != critical_head_indices(report["critical"]):
        return "critical_heads disagrees with the critical list"
    if report.get("mode", MODES[0]) not in MODES:
        return f"mode {report['mode']!r}"
    if report.get("metric", METRICS[0]) not in METRICS:
        return f"metric {report['metric']!r}"
    if "heads" not in report:
        return None
    if not isinstance(report["heads"], list):
        return "heads is not a list"
    for i, h in enumerate(report["heads"]):
        if not isinstance(h, dict) or not {"layer", "head", "drop", "critical"} <= h.keys():
            return f"heads[{i}] lacks layer/head/drop/critical"
        if not _is_index(h["head"]) or not (h["layer"] is None or _is_index(h["layer"])):
            return f"heads[{i}] layer/head are not indices"
    marked = [{"layer": h["layer"], "head": h["head"]} for h in report["heads"] if h["critical"]]
    if report.get("critical", marked) != marked or report.get(
        "critical_heads", critical_head_indices(marked)
    ) != critical_head_indices(marked):
        return "its critical list disagrees with the heads marked critical"
    return None


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise VlmCreditError(f"--{name} {value}: choose one of {', '.join(choices)}")
