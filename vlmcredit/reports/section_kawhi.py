"""KAWHI section: SGUF overlays of a regions run and the paragraph weights of a KAWHI weights
run (each response's paragraphs shaded by their weight, with their mean alpha)."""

from __future__ import annotations

import numpy as np

from vlmcredit.formats.regions import (
    PARAGRAPHS_PARQUET,
    REGIONS_PARQUET,
    read_paragraphs,
    read_regions,
)
from vlmcredit.reports.figures import Figure
from vlmcredit.reports.html import Raw, esc, figure, key_values, note, section
from vlmcredit.reports.loaders import RunInput
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder
from vlmcredit.reports.tokens import ShadeScale, shaded_tokens


def _regions(run: RunInput, options: ReportOptions) -> tuple[list[str], list[Figure]]:
    frame = read_regions(run.path)
    images = frame.groupby(["sample_id", "image"], sort=False).ngroups
    summary = run.manifest.get("regions", {})
    body: list[str] = [
        key_values(
            [
                ("images / cells", f"{images} / {len(frame)}"),
                ("key cells", f"{frame['key'].mean():.1%}" if len(frame) else "–"),
                ("selected cells", f"{frame['selected'].mean():.1%}" if len(frame) else "–"),
                ("SGUF seconds", summary.get("sguf_seconds")),
                ("parameters", str(run.manifest.get("parameters", {}).get("sguf", "–"))),
            ]
        )
    ]
    figures = []
    previews = sorted((run.path / "previews").glob("*.png"))[: options.samples]
    for k, png in enumerate(previews):
        figures.append(
            Figure(
                f"{run.label}-sguf-{k}",
                f"{png.stem}: key regions (orange), sampled background (blue outline)",
                png.read_bytes(),
            )
        )
        body.append(figure(figures[-1]))
    if not previews:
        body.append(note("No overlay previews in this run (vlmcredit regions --preview N)."))
    return body, figures


def _paragraphs(run: RunInput, options: ReportOptions) -> list[str]:
    frame = read_paragraphs(run.path)
    weights = frame["weight"].to_numpy(dtype=np.float64)
    scale = ShadeScale.fit(weights, upper_quantile=1.0)
    body: list[str] = [
        key_values(
            [
                ("responses / paragraphs", f"{frame['response_id'].nunique()} / {len(frame)}"),
                ("mean paragraph weight", float(weights.mean()) if weights.size else None),
            ]
        ),
        scale.legend("paragraph weight", cls="weights"),
    ]
    for (sid, rid), part in list(frame.groupby(["sample_id", "response_id"], sort=False))[
        : options.samples
    ]:
        texts = [str(t) for t in part["text"]]
        info = " · ".join(
            f"¶{int(p)}: alpha {a:.3f}, w {w:.3f}"
            for p, a, w in zip(part["paragraph"], part["alpha"], part["weight"], strict=True)
        )
        body.append(
            f'<div class="sample"><h4>Sample {esc(sid)} · response {esc(str(rid)[:12])}</h4>'
            f"<p>{esc(info)}</p>"
            + shaded_tokens(
                texts,
                scale.buckets(part["weight"].to_numpy()),
                None,
                options.max_tokens,
                cls="weights",
            )
            + "</div>"
        )
    return body


def build(run: RunInput, options: ReportOptions) -> Section:
    body: list[str] = []
    figures: list[Figure] = []
    if run.has(REGIONS_PARQUET):
        body.append("<h3>SGUF key regions</h3>")
        part, figures = _regions(run, options)
        body.extend(part)
    if run.has(PARAGRAPHS_PARQUET):
        body.append("<h3>KAWHI paragraph weights</h3>")
        body.extend(_paragraphs(run, options))
    anchor = f"{run.label}-kawhi"
    title = f"KAWHI — {run.label}"
    return Section("kawhi", title, anchor, Raw(section(anchor, title, body)), figures)


BUILDER = SectionBuilder(
    "kawhi",
    "KAWHI",
    lambda run: run.has(REGIONS_PARQUET) or run.has(PARAGRAPHS_PARQUET),
    build,
)
