"""Vision-critical heads from MME head-ablation scores: drops, selection, the heads.json object.

Pure functions on plain score dicts (no torch, no model code, no file I/O), so the selection
rule and the object of the file contract (docs/FORMATS.md, "heads run") can be tested on
hand-built numbers; `vlmcredit.formats.heads` writes and reads the files. A score dict
is `{"total", "perception", "cognition", "subtasks": {category: {"acc", "acc_plus", "score"}}}`
as `scores_dict` builds it from `vlmcredit.data.mme_score.MMEScores`.

Selection (the KAWHI protocol): ablate a configuration, re-score MME, drop = baseline - ablated;
a configuration is vision-critical when its drop on the chosen metric exceeds the threshold
(default 100 on the total). Drops are compared at 1e-6 resolution, so float noise in a drop that
is exactly the threshold (e.g. 100.00000000000001) does not make a head critical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlmcredit.data.mme import CATEGORIES, PERCEPTION
from vlmcredit.errors import VlmCreditError

METRICS = ("total", "perception")
GROUPS = ("total", "perception", "cognition")
MODES = ("head-index", "layer-head")
ABLATIONS = ("zero", "mean")
ANSWERING = ("logits", "generate")
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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise VlmCreditError(f"--{name} {value}: choose one of {', '.join(choices)}")
