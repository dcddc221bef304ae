"""Anchors section: connectivity histogram with the cut; per sample the shaded response text,
attention of the top clusters drawn over the image, and the cluster table."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlmcredit.reports import figures
from vlmcredit.reports.html import Raw, esc, figure, fmt, key_values, note, section, table
from vlmcredit.reports.loaders import (
    ANCHORS_PARQUET,
    AnchorsResult,
    RunInput,
    read_anchors,
    read_sample_attention,
    safe_name,
)
from vlmcredit.reports.section_summary import flatten_parameters
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder
from vlmcredit.reports.tokens import ShadeScale, clean_token, shaded_tokens

EXAMPLE_TOKENS = 10  # tokens quoted per cluster in the cluster table
EXAMPLE_CHARS = 80
KEY_PARAMETERS = {
    "mode",
    "backend",
    "objective",
    "resolution",
    "parts",
    "seed",
    "sink",
    "sink_k",
    "top_k",
    "knn",
    "other_weight",
    "ratio_scope",
    "fill",
    "preset",
    "layers",
    "heads",
    "heads_json",
}


def _clusters(tokens: Any, stored: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Cluster rows for one sample, ranked by mean connectivity (highest first)."""
    rows = []
    for cid, part in tokens[tokens["cluster"] >= 0].groupby("cluster", sort=False):
        # Members are rarely adjacent in the text: a separator keeps token boundaries visible.
        text = " · ".join(clean_token(t).strip() or "␣" for t in part["token"].head(EXAMPLE_TOKENS))
        rows.append(
            {
                "id": int(cid),
                "size": len(part),
                "mean_connectivity": float(part["connectivity"].mean()),
                "anchor": bool(part["anchor"].any()),
                "num_anchors": int(part["anchor"].sum()),
                "tokens": text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…",
                "index": part.index.to_numpy(),
            }
        )
    # Trust the run's own anchor flag per cluster when it recorded one.
    flags = {c.get("id"): c.get("anchor") for c in (stored or {}).get("clusters") or []}
    for row in rows:
        if flags.get(row["id"]) is not None:
            row["anchor"] = bool(flags[row["id"]])
    return sorted(rows, key=lambda r: -r["mean_connectivity"])


def _anchor_cell(cluster: dict[str, Any]) -> str | bool:
    """yes / no, or "k of n anchors" for the cluster the fill split (--fill)."""
    if cluster["anchor"] and 0 < cluster["num_anchors"] < cluster["size"]:
        return f"{cluster['num_anchors']} of {cluster['size']} anchors"
    return bool(cluster["anchor"])


def _groups(tokens: Any, clusters: list[dict[str, Any]], res: AnchorsResult, top: int):
    """(label, row positions within the sample) of the token groups drawn over the image."""
    start = tokens.index[0]
    if res.threshold_mode or not clusters:
        anchors = tokens["anchor"].to_numpy()
        groups = [("anchors", np.nonzero(anchors)[0]), ("other tokens", np.nonzero(~anchors)[0])]
        return [(label, idx) for label, idx in groups if idx.size]
    groups = []
    for c in clusters[:top]:
        if not c["anchor"]:
            tag = "other"
        else:  # the cluster the fill split shows its share
            tag = "anchor" if c["num_anchors"] >= c["size"] else f"{c['num_anchors']} anchors"
        label = f"cluster {c['id']} ({c['size']} tok, {tag})"
        groups.append((label, c["index"] - start))
    return groups


def _sample_block(
    run: RunInput,
    res: AnchorsResult,
    sample_id: str,
    scale: ShadeScale,
    options: ReportOptions,
    figs: list[figures.Figure],
) -> str:
    tokens = res.tokens[res.tokens["sample_id"] == sample_id]
    stored = next(
        (s for s in res.summary.get("samples") or [] if str(s.get("sample_id")) == sample_id), None
    )
    values = tokens["connectivity"].to_numpy()
    anchors = tokens["anchor"].to_numpy()
    clusters = [] if res.threshold_mode else _clusters(tokens, stored)
    facts = f"{len(tokens)} tokens · {int(anchors.sum())} anchors ({anchors.mean():.1%})"
    if stored and isinstance(stored.get("modularity"), (int, float)):
        facts += f" · modularity {stored['modularity']:.3f}"
    parts = [
        f"<h4>Sample {esc(sample_id)}</h4><p>{esc(facts)}</p>",
        shaded_tokens(list(tokens["token"]), scale.buckets(values), anchors, options.max_tokens),
    ]
    attention = read_sample_attention(run, sample_id, len(tokens))
    if attention is None:
        parts.append(note("No attention stored for this sample: no image map."))
    else:
        groups = [
            (label, attention.attention[idx].mean(axis=0))
            for label, idx in _groups(tokens, clusters, res, options.top_clusters)
        ]
        fig = figures.attention_panels(
            groups,
            attention.boxes,
            attention.owner,
            attention.thumbs,
            f"sample-{safe_name(sample_id)}-{len(figs)}",
            f"{run.label} sample {sample_id}: mean attention of each group's tokens",
        )
        figs.append(fig)
        parts.append(figure(fig))
        if not attention.thumbs:
            parts.append(note("No thumbnail stored: cells drawn on a blank canvas."))
    if clusters:
        rows = [
            [c["id"], c["size"], c["mean_connectivity"], _anchor_cell(c), c["tokens"]]
            for c in clusters
        ]
        headers = ["cluster", "tokens", "mean connectivity", "anchor", "first tokens"]
        parts.append(table(headers, rows, cls="clusters"))
    return f'<div class="sample">{"".join(parts)}</div>'


def _spread_text(spread: Any) -> str:
    """One line on how the per-response shares spread around the target (anchors.json)."""
    if not isinstance(spread, dict):
        return "not recorded (run from an older vlmcredit)"
    if not spread.get("num_responses"):
        return "no responses"
    points = 100 * float(spread["tolerance"])
    text = (
        f"min {spread['min']:.1%} · median {spread['median']:.1%} · max {spread['max']:.1%}; "
        f"{spread['within_tolerance']:.0%} of {spread['num_responses']} within ±{points:.0f} "
        "points of the target"
    )
    short = spread["num_responses"] - spread["long_enough"]
    if short:
        text += f" ({short} too short for that: under {math.ceil(50 / points)} tokens)"
    return text


def build(run: RunInput, options: ReportOptions) -> Section:
    res = read_anchors(run)
    tokens = res.tokens
    values = tokens["connectivity"].to_numpy()
    anchors = tokens["anchor"].to_numpy()
    summary = res.summary
    conn = summary.get("connectivity") or {}
    hist = figures.connectivity_histogram(
        res.edges,
        values,
        anchors,
        res.cut,
        res.ratio_target,
        res.ratio_achieved,
        "connectivity",
        f"{run.label}: token connectivity",
    )
    figs = [hist]
    agreement = summary.get("agreement") or {}
    params = run.manifest.get("parameters") or summary.get("parameters") or {}
    facts = [
        ("anchors by", "threshold (top ratio)" if res.threshold_mode else "clusters"),
        ("samples / tokens", f"{len(res.sample_ids)} / {len(tokens)}"),
        ("anchors", int(anchors.sum())),
        ("ratio target / achieved", f"{res.ratio_target:.1%} / {res.ratio_achieved:.1%}"),
        ("anchor share per response", _spread_text(summary.get("ratio_per_response"))),
        ("cut (lowest anchor connectivity)", res.cut),
        ("bimodality coefficient", conn.get("bimodality_coefficient")),
    ]
    if agreement:
        facts.append(
            (
                "agreement with threshold anchors",
                ", ".join(
                    f"{k} {fmt(agreement.get(k), 3)}" for k in ("jaccard", "precision", "recall")
                ),
            )
        )
    # The analysis choices a reader needs beside the histogram (all parameters: Runs section).
    for key, value in flatten_parameters(params):
        if key.rsplit(".", 1)[-1] in KEY_PARAMETERS and value is not None:
            facts.append((key, str(value)))
    scale = ShadeScale.fit(values)
    body: list[str] = [key_values(facts), figure(hist)]
    shown = res.sample_ids[: options.samples]
    if shown:
        body.append(f"<h3>Samples ({len(shown)} of {len(res.sample_ids)})</h3>")
        body.append(scale.legend("connectivity", marked="anchor"))
        if len(shown) < len(res.sample_ids):
            body.append(note(f"Showing {len(shown)} of {len(res.sample_ids)} samples (--samples)."))
        for sample_id in shown:
            body.append(_sample_block(run, res, sample_id, scale, options, figs))
    anchor = f"{run.label}-anchors"
    title = f"Anchors — {run.label}"
    return Section("anchors", title, anchor, Raw(section(anchor, title, body)), figs)


BUILDER = SectionBuilder("anchors", "Anchors", lambda run: run.has(ANCHORS_PARQUET), build)
