"""heads.json + heads.parquet of a probe-heads run: the one writer and the one validating reader.

The object itself (docs/FORMATS.md, "heads run") is built by `vlmcredit.analysis.heads`
(`build_heads_report`); this module puts it on disk and reads it back. Two kinds of file are
read: a full probe-heads heads.json (checked for consistency: its critical list must match the
heads marked critical) and a hand-written one holding only `critical` or only `critical_heads`
(e.g. the heads a paper lists). Consumers that draw every head's numbers (the report) ask for a
full file with `full=True`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet

HEADS_JSON = "heads.json"
HEADS_PARQUET = "heads.parquet"
# The file's vocabulary. The same names are the choices `vlmcredit.analysis.heads` checks
# (analysis may not import formats; tests/formats/test_heads.py keeps the two equal).
MODES = ("head-index", "layer-head")
METRICS = ("total", "perception")
GROUPS = ("total", "perception", "cognition")
THRESHOLD_RULES = ("absolute", "relative")
CONTROLS = ("constant_yes", "constant_no", "gray_image")
LABELS = ("yes", "no", "other")


def critical_heads_of(critical: Sequence[Mapping[str, Any]]) -> list[int]:
    """Sorted unique head indices of the critical configurations (layer ignored)."""
    return sorted({int(c["head"]) for c in critical})


def heads_outside(
    critical: Sequence[Mapping[str, Any]], num_layers: int, num_heads: int
) -> str | None:
    """What a model of `num_layers` x `num_heads` lacks among the critical (layer, head)
    entries (a heads.json of another checkpoint), or None when it has them all."""
    for c in critical:
        if int(c["head"]) >= num_heads:
            return f"head {c['head']} does not exist in a model with {num_heads} heads"
        if c.get("layer") is not None and int(c["layer"]) >= num_layers:
            return f"layer {c['layer']} does not exist in a model with {num_layers} layers"
    return None


# -- writing --------------------------------------------------------------------------------------
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
    if rows and all("answers" in h for h in rows):  # a run written before the answer shares
        for label in LABELS:
            columns[f"share_{label}"] = np.array([h["answers"][label] for h in rows], np.float64)
        columns["constant"] = pd.array([h["answers"]["constant"] for h in rows], "string")
        columns["format_broken"] = np.array([h["answers"]["format_broken"] for h in rows], bool)
    for c in categories:
        columns[f"score_{c}"] = np.array([h["subtasks"].get(c, np.nan) for h in rows], np.float64)
    return pd.DataFrame(columns)


def write_heads(run_dir: Path, report: Mapping[str, Any]) -> None:
    """Write heads.json and heads.parquet into a run folder (atomically, table first)."""
    problem = _heads_problem(report)
    if problem:  # a bug in whoever built the report: never write a file the reader refuses
        raise ValueError(f"refusing to write an inconsistent heads.json: {problem}")
    atomic_write_parquet(Path(run_dir) / HEADS_PARQUET, heads_table(report))
    atomic_write_json(Path(run_dir) / HEADS_JSON, report)


# -- reading --------------------------------------------------------------------------------------
def read_heads(path: str | Path, *, full: bool = False) -> dict[str, Any]:
    """Read and validate heads.json from a run folder or the file itself.

    A probe-heads heads.json is checked in full (its critical list must match the heads marked
    critical). Unless `full`, a hand-written file may hold only `critical` ([{"layer": null |
    int, "head": int}]) or only `critical_heads` ([int], meaning each head in every layer); the
    missing one of the two is filled in. With `full`, the file must be a probe-heads result:
    mode, metric, threshold, the baseline and a non-empty `heads` list with every head's drop.
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
        raise VlmCreditError(
            f"{file}: not valid JSON ({exc}); rerun vlmcredit probe-heads"
        ) from None
    problem = _heads_problem(report, full)
    if problem:
        hint = "" if full else ' or write {"critical_heads": [0, 1, ...]}'
        raise VlmCreditError(
            f"{file}: not a usable heads.json ({problem}); rerun vlmcredit probe-heads{hint}"
        )
    if "critical" not in report:
        report["critical"] = [{"layer": None, "head": h} for h in report["critical_heads"]]
    report["critical_heads"] = critical_heads_of(report["critical"])
    return report


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _heads_problem(report: Any, full: bool = False) -> str | None:
    """What is wrong with a parsed heads.json, or None."""
    if not isinstance(report, Mapping):
        return "top level is not an object"
    if full:
        missing = [k for k in ("mode", "threshold", "baseline", "heads") if k not in report]
        if missing:
            return f"missing key '{missing[0]}'"
    if "critical" not in report and "critical_heads" not in report:
        return "neither critical nor critical_heads"
    if "critical" in report:
        critical = report["critical"]
        if not isinstance(critical, list) or not all(
            isinstance(c, Mapping)
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
    ] != critical_heads_of(report["critical"]):
        return "critical_heads disagrees with the critical list"
    mode = report.get("mode", MODES[0])
    if mode not in MODES:
        return f"mode {report['mode']!r}"
    metric = report.get("metric", METRICS[0])
    if metric not in METRICS:
        return f"metric {report['metric']!r}"
    if full:
        if not _is_number(report["threshold"]):
            return f"threshold {report['threshold']!r} is not a number"
        baseline = report["baseline"]
        if not isinstance(baseline, Mapping) or not _is_number(baseline.get(metric)):
            return f"baseline.{metric} is not a number"
        if not isinstance(report["heads"], list) or not report["heads"]:
            return "heads is empty"
    if "heads" not in report:
        return None
    if not isinstance(report["heads"], list):
        return "heads is not a list"
    for i, h in enumerate(report["heads"]):
        if not isinstance(h, Mapping) or not {"layer", "head", "drop", "critical"} <= h.keys():
            return f"heads[{i}] lacks layer/head/drop/critical"
        if not _is_index(h["head"]) or not (h["layer"] is None or _is_index(h["layer"])):
            return f"heads[{i}] layer/head are not indices"
        if not isinstance(h["critical"], bool):
            return f"heads[{i}].critical is {h['critical']!r}, not true/false"
        if full:
            if mode == "layer-head" and h["layer"] is None:
                return f"heads[{i}] has no layer in layer-head mode"
            if not isinstance(h["drop"], Mapping) or not _is_number(h["drop"].get(metric)):
                return f"heads[{i}].drop.{metric} is not a number"
        if "answers" in h and _answers_problem(h["answers"]):
            return f"heads[{i}].answers: {_answers_problem(h['answers'])}"
    problem = _controls_problem(report)
    if problem:
        return problem
    marked = [{"layer": h["layer"], "head": h["head"]} for h in report["heads"] if h["critical"]]
    if report.get("critical", marked) != marked or report.get(
        "critical_heads", critical_heads_of(marked)
    ) != critical_heads_of(marked):
        return "its critical list disagrees with the heads marked critical"
    return None


def _answers_problem(answers: Any) -> str | None:
    """What is wrong with an `answers` object (shares of yes / no / other, constant label)."""
    if not isinstance(answers, Mapping):
        return "not an object"
    shares = [answers.get(label) for label in LABELS]
    if not all(_is_number(x) and 0 <= x <= 1 for x in shares):
        return "yes/no/other must be shares in [0, 1]"
    if abs(sum(shares) - 1) > 1e-6:
        return "yes/no/other shares do not sum to 1"
    if answers.get("constant") not in (None, *LABELS):
        return f"constant {answers.get('constant')!r}"
    if not isinstance(answers.get("format_broken"), bool):
        return "format_broken is not true/false"
    return None


def _controls_problem(report: Mapping[str, Any]) -> str | None:
    """The threshold rule and the controls, checked when present (runs since the controls)."""
    if "threshold_rule" in report:
        rule = report["threshold_rule"]
        if not isinstance(rule, Mapping) or rule.get("rule") not in THRESHOLD_RULES:
            return "threshold_rule.rule must be absolute or relative"
        if not isinstance(rule.get("reason"), str) or not isinstance(rule.get("formula"), str):
            return "threshold_rule lacks its reason / formula"
        if "threshold" in report and rule.get("threshold") != report["threshold"]:
            return "threshold_rule.threshold disagrees with threshold"
    baseline = report.get("baseline")
    if isinstance(baseline, Mapping) and "answers" in baseline:
        problem = _answers_problem(baseline["answers"])
        if problem:
            return f"baseline.answers: {problem}"
    if "controls" not in report:
        return None
    controls = report["controls"]
    if not isinstance(controls, Mapping) or set(controls) != set(CONTROLS):
        return f"controls must hold {', '.join(CONTROLS)}"
    for name in CONTROLS:
        if not isinstance(controls[name], Mapping) or not all(
            _is_number(controls[name].get(g)) for g in GROUPS
        ):
            return f"controls.{name} lacks total/perception/cognition"
    if "answers" in controls["gray_image"] and _answers_problem(controls["gray_image"]["answers"]):
        return f"controls.gray_image.answers: {_answers_problem(controls['gray_image']['answers'])}"
    return None


__all__ = [
    "CONTROLS",
    "GROUPS",
    "HEADS_JSON",
    "HEADS_PARQUET",
    "LABELS",
    "METRICS",
    "MODES",
    "THRESHOLD_RULES",
    "critical_heads_of",
    "heads_outside",
    "heads_table",
    "read_heads",
    "write_heads",
]
