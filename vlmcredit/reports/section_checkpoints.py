"""Checkpoint comparison section (a `vlmcredit compare --ckpt ...` folder): per checkpoint the
connectivity distribution and head ablation, per pair their shift and the anchor overlap."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmcredit.formats.checkpoints import CHECKPOINTS_JSON, read_checkpoints
from vlmcredit.reports import figures
from vlmcredit.reports.html import Raw, figure, note, section, table
from vlmcredit.reports.loaders import RunInput
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder

_PER_CHECKPOINT = (
    ("tokens", "anchors", "tokens"),
    ("anchor share", "anchors", "anchor_share"),
    ("connectivity mean", "anchors", "connectivity_mean"),
    ("connectivity median", "anchors", "connectivity_median"),
    ("bimodality", "anchors", "bimodality_coefficient"),
    ("anchor - other connectivity", "anchors", "anchor_contrast"),
    ("baseline MME", "heads", "baseline"),
    ("critical heads", "heads", "num_critical"),
    ("largest drop", "heads", "max_drop"),
)
_ANCHOR_SHIFT = (
    ("Δ anchor share", "anchor_share_change"),
    ("Δ connectivity mean", "connectivity_mean_change"),
    ("Δ connectivity median", "connectivity_median_change"),
    ("Δ bimodality", "bimodality_coefficient_change"),
    ("Δ anchor - other", "anchor_contrast_change"),
    ("anchor jaccard", "jaccard"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("connectivity Spearman", "connectivity_spearman"),
)
_HEAD_SHIFT = (
    ("Δ baseline MME", "baseline_change"),
    ("Δ largest drop", "max_drop_change"),
    ("Δ mean drop", "mean_drop_change"),
    ("mean |Δ drop|", "mean_abs_drop_change"),
    ("critical jaccard", "critical_jaccard"),
    ("drop Spearman", "drop_spearman"),
)


def _head_name(layer: int | None, head: int) -> str:
    return f"head {head}" if layer is None else f"L{layer} H{head}"


def _direction(change: float | None, up: str, down: str, same: str) -> str | None:
    if change is None:
        return None
    return up if change > 0 else down if change < 0 else same


def _verdict(result: dict[str, Any]) -> str | None:
    """One sentence on the overall pair (first -> last): do anchors and vision heads sharpen?"""
    pairs = result["pairs"]
    overall = next((p for p in pairs if p.get("kind") == "first-last"), pairs[0] if pairs else None)
    if overall is None:
        return None
    parts = []
    a, h = overall.get("anchors"), overall.get("heads")
    if a:
        bc = _direction(
            a.get("bimodality_coefficient_change"),
            "more bimodal",
            "less bimodal",
            "as bimodal as before",
        )
        gap = _direction(
            a.get("anchor_contrast_change"),
            "anchors stand further above the other tokens",
            "anchors stand less above the other tokens",
            "anchors stand as far above the other tokens",
        )
        parts.append(
            f"connectivity is {bc or '–'}, {gap or 'anchor contrast not measured'}, and "
            f"{_pct(a.get('jaccard'))} of the anchor tokens are shared (Jaccard)"
        )
    if h:
        base = _direction(
            h.get("baseline_change"),
            "the MME baseline rises",
            "the MME baseline falls",
            "the MME baseline stays",
        )
        drop = _direction(
            h.get("max_drop_change"),
            "the largest head-ablation drop grows (vision heads matter more)",
            "the largest head-ablation drop shrinks",
            "the largest head-ablation drop stays the same",
        )
        parts.append(f"{base or '–'} and {drop or '–'}")
    if not parts:
        return None
    return f"From {overall['a']} to {overall['b']}: " + "; ".join(parts) + "."


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.0f}%"


def _drops_matrix(
    checkpoints: list[dict[str, Any]],
) -> tuple[list[tuple[int | None, int]], np.ndarray, np.ndarray] | None:
    if not all(c.get("heads") for c in checkpoints):
        return None
    keys: list[tuple[int | None, int]] = []
    for c in checkpoints:
        for d in c["heads"]["drops"]:
            key = (d["layer"], int(d["head"]))
            if key not in keys:
                keys.append(key)
    index = {k: i for i, k in enumerate(keys)}
    drops = np.full((len(keys), len(checkpoints)), np.nan)
    critical = np.zeros_like(drops, dtype=bool)
    for j, c in enumerate(checkpoints):
        for d in c["heads"]["drops"]:
            i = index[(d["layer"], int(d["head"]))]
            drops[i, j] = float(d["drop"])
            critical[i, j] = bool(d["critical"])
    return keys, drops, critical


def build(run: RunInput, options: ReportOptions) -> Section:
    result = read_checkpoints(run.path)
    checkpoints = result["checkpoints"]
    labels = [c["label"] for c in checkpoints]
    anchor = f"{run.label}-checkpoints"
    body: list[str] = [
        note(
            "The same rollouts (and MME questions) through every checkpoint, in the order given. "
            "Anchor overlap is keyed by (sample, token index): precision = share of the earlier "
            "checkpoint's anchors still anchors in the later one, recall = share of the later "
            "one's anchors that were anchors before. Δ = later minus earlier. Bimodality is "
            "Sarle's coefficient of per-token connectivity (above 0.555: bimodal)."
        )
    ]
    verdict = _verdict(result)
    if verdict:
        body.append(note(verdict))
    rollouts, mme = result.get("rollouts") or {}, result.get("mme") or {}
    if rollouts:
        body.append(
            note(
                f"Rollouts: {rollouts.get('data')} ({rollouts.get('samples')} samples, "
                f"{rollouts.get('tokens')} response tokens)."
            )
        )
    if mme:
        body.append(
            note(
                f"MME: {mme.get('path') or '–'} ({mme.get('num_questions')} questions), drops in "
                f"{mme.get('metric')}, {mme.get('mode')} ablation."
            )
        )
    matrix = _drops_matrix(checkpoints)
    has_anchors = all(c.get("anchors") for c in checkpoints)
    series: dict[str, list[float | None]] = {}
    if has_anchors:
        for key, name in (
            ("bimodality_coefficient", "bimodality"),
            ("anchor_share", "anchor share"),
            ("anchor_contrast", "anchor - other connectivity"),
            ("connectivity_mean", "connectivity mean"),
        ):
            series[name] = [c["anchors"].get(key) for c in checkpoints]
    fig = figures.checkpoint_trends(
        labels,
        series,
        None if matrix is None else matrix[1],
        None if matrix is None else matrix[2],
        [] if matrix is None else [_head_name(*k) for k in matrix[0]],
        str(mme.get("metric") or "total"),
        "checkpoints",
        f"{run.label}: checkpoints",
    )
    body.append(figure(fig))
    shown = [
        (title, part, key)
        for title, part, key in _PER_CHECKPOINT
        if any((c.get(part) or {}).get(key) is not None for c in checkpoints)
    ]
    body.append(
        table(
            ("checkpoint", *(t for t, _, _ in shown), "path"),
            [
                [c["label"], *((c.get(p) or {}).get(k) for _, p, k in shown), c.get("checkpoint")]
                for c in checkpoints
            ],
            caption="per checkpoint",
        )
    )
    pairs = result["pairs"]
    columns: list[tuple[str, str, str]] = []
    if any(p.get("anchors") for p in pairs):
        columns += [(t, "anchors", k) for t, k in _ANCHOR_SHIFT]
    if any(p.get("heads") for p in pairs):
        columns += [(t, "heads", k) for t, k in _HEAD_SHIFT]
    body.append(
        table(
            ("from", "to", *(t for t, _, _ in columns)),
            [
                [p["a"], p["b"], *((p.get(part) or {}).get(k) for _, part, k in columns)]
                for p in pairs
            ],
            caption="shift per pair",
        )
    )
    if matrix is not None:
        keys, drops, critical = matrix
        order = np.argsort(-np.nan_to_num(np.abs(drops[:, -1] - drops[:, 0])), kind="stable")
        rows = []
        for i in order:
            flagged = [labels[j] for j in np.flatnonzero(critical[i])]
            rows.append(
                [
                    _head_name(*keys[i]),
                    *(float(v) for v in drops[i]),
                    float(drops[i, -1] - drops[i, 0]),
                    ", ".join(flagged) or "–",
                ]
            )
        headers = (
            "configuration",
            *(f"drop @ {label}" for label in labels),
            f"Δ {labels[0]} → {labels[-1]}",
            "critical in",
        )
        caption = "each head's ablation drop (largest change first)"
        body.append(table(headers, rows, caption=caption))
    title = f"Checkpoint comparison — {run.label}"
    return Section("checkpoints", title, anchor, Raw(section(anchor, title, body)), [fig])


BUILDER = SectionBuilder(
    "checkpoints", "Checkpoint comparison", lambda run: run.has(CHECKPOINTS_JSON), build
)
