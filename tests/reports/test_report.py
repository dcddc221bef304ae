"""The report from heads, anchors and signals runs: sections, numbers, figures, escaping, size."""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reports.page import Page, png_of
from tests.reports.runs_fixture import (
    ImageSpec,
    write_anchors_run,
    write_heads_run,
)
from vlmcredit.reports.report import build_report, write_report
from vlmcredit.reports.sections import (
    ReportOptions,
    Section,
    SectionBuilder,
    register_section,
    unregister_section,
)

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report-runs")
    return {
        "heads": write_heads_run(root / "heads", critical_heads=(0, 1, 3, 12)),
        "layer_head": write_heads_run(
            root / "heads-lh", mode="layer-head", num_layers=6, num_heads=8, critical_heads=(2, 5)
        ),
        "anchors": write_anchors_run(root / "anchors"),
        "threshold": write_anchors_run(
            root / "anchors-thr", num_samples=2, threshold_mode=True, thumbs=False, signals=False
        ),
    }


@pytest.fixture(scope="module")
def both(runs, tmp_path_factory) -> tuple[Page, Path, object]:
    """One report of a heads run and an anchors run (with signals), written to disk."""
    out = tmp_path_factory.mktemp("report-both")
    report = build_report([runs["heads"].path, runs["anchors"].path])
    write_report(report, out / "report.html", out / "figs")
    return Page(report.html), out, report


def _assert_self_contained(page: Page) -> None:
    """No scripts, no event handlers, every image an embedded PNG, every link in-page."""
    names = {t for t, _ in page.tags}
    assert "script" not in names and "iframe" not in names and "object" not in names
    for _tag, attrs in page.tags:
        assert not any(k.startswith("on") for k in attrs), attrs
    for img in page.find("img"):
        assert img.get("class") == "fig"
        assert png_of(img).format == "PNG"
    for a in page.find("a"):
        assert (a.get("href") or "").startswith("#")
    for link in page.find("link"):
        assert link.get("href") == "data:,"


def test_heads_head_index_section(runs) -> None:
    planted = runs["heads"].report
    report = build_report([runs["heads"].path])
    page = Page(report.html)
    _assert_self_contained(page)
    assert {"summary", "r1-heads-heads"} <= set(page.ids)
    text = page.all_text()
    # Critical heads as planted (the fixture's drops, not recomputed by the report).
    expected = [h["head"] for h in planted["heads"] if h["critical"]]
    assert expected == [0, 1, 3, 12]
    assert "H0, H1, H3, H12" in text
    assert f"total {planted['baseline']['total']:.1f}" in text
    # Head table sorted by drop, the top one flagged critical.
    heads = page.table("Heads by drop")
    drops = [float(r[2]) for r in heads.rows]
    assert drops == sorted(drops, reverse=True)
    top = max(planted["heads"], key=lambda h: h["drop"]["total"])
    assert int(heads.rows[0][1]) == top["head"] and heads.rows[0][6] == "critical"
    # Per-subtask drop of each critical head = baseline score - ablated score (hand computed).
    sub = page.table("Per subtask")
    for row in sub.rows:
        category = row[0]
        base = planted["baseline"]["subtasks"][category]["score"]
        assert float(row[3]) == pytest.approx(base, rel=1e-3)
        for header, value in zip(sub.headers[4:], row[4:], strict=True):
            head = int(header.split("H")[-1])
            ablated = next(h for h in planted["heads"] if h["head"] == head)["subtasks"][category]
            assert float(value) == pytest.approx(base - ablated, rel=1e-3, abs=1e-2)
    imgs = page.find("img")
    assert len(imgs) == 1 and png_of(imgs[0]).size[0] > 300
    assert report.figures["r1-heads-heads-drop"].svg.startswith(b"<?xml")


def test_heads_layer_head_grid(runs) -> None:
    planted = runs["layer_head"].report
    page = Page(build_report([runs["layer_head"].path]).html)
    _assert_self_contained(page)
    crit = [(h["layer"], h["head"]) for h in planted["heads"] if h["critical"]]
    assert crit == [(5, 2), (5, 5)]
    assert "L5 H2, L5 H5" in page.all_text()
    assert len(page.table("Heads by drop").rows) == 24  # top 24 of 48


def test_anchors_section_tokens_clusters_and_maps(runs) -> None:
    planted = runs["anchors"]
    report = build_report([planted.path], ReportOptions(samples=2))
    page = Page(report.html)
    _assert_self_contained(page)
    assert "r1-anchors-anchors" in page.ids
    text = page.all_text()
    assert "Showing 2 of 3 samples" in text
    # Shading reference: buckets by the hand formula over the whole run's connectivity.
    values = np.concatenate([s.connectivity for s in planted.samples]).astype(np.float64)
    lo, hi = values.min(), np.quantile(values, 0.995)
    anchor_runs = [r for r in page.token_runs if "weights" not in r.classes.split()]
    assert len(anchor_runs) == 2
    for run_, sample in zip(anchor_runs, planted.samples[:2], strict=True):
        assert run_.text == "".join(sample.tokens)
        expected = []
        for token, c, a in zip(sample.tokens, sample.connectivity, sample.anchor, strict=True):
            k = int(np.clip(np.floor((float(c) - lo) / (hi - lo) * 10), 0, 9))
            if a:
                expected.append((f"m{k}", token))
            elif k:
                expected.append((f"s{k}", token))
        assert run_.elements == expected
        assert sum(cls.startswith("m") for cls, _ in run_.elements) == int(sample.anchor.sum())
    # Cluster table of sample s0: sizes and mean connectivity from the planted tokens.
    s0 = planted.samples[0]
    table = next(
        t for t in page.tables if t.headers[:3] == ["cluster", "tokens", "mean connectivity"]
    )
    for row in table.rows:
        members = s0.cluster == int(row[0])
        assert int(row[1]) == int(members.sum())
        assert float(row[2]) == pytest.approx(float(s0.connectivity[members].mean()), rel=1e-3)
        assert (row[3] == "yes") == bool(s0.anchor[members].all())
    means = [float(r[2]) for r in table.rows]
    assert means == sorted(means, reverse=True)
    # Histogram + one attention map per shown sample; maps span both images, drawn on thumbs.
    imgs = page.find("img")
    assert len(imgs) == 1 + 2 + 1  # histogram, 2 samples, signals weights
    shown = png_of(imgs[1])
    assert shown.size[0] > shown.size[1] * 0.5 and shown.size[0] > 400
    assert "cut (lowest anchor connectivity)" in text
    assert f"{planted.samples[0].connectivity[planted.samples[0].anchor].min():.3g}"[:4] in text


def test_threshold_mode_without_thumbs(runs) -> None:
    page = Page(build_report([runs["threshold"].path]).html)
    _assert_self_contained(page)
    text = page.all_text()
    assert "threshold (top ratio)" in text
    assert "No thumbnail stored: cells drawn on a blank canvas." in text
    assert not any(t.headers[:1] == ["cluster"] for t in page.tables)  # no clusters to list
    assert "r1-anchors-thr-signals" not in page.ids  # this run wrote no signals.parquet


def test_heads_and_anchors_together_with_signals(both) -> None:
    page, out, report = both
    _assert_self_contained(page)
    sections = [
        s
        for s in page.ids
        if s in ("summary", "r1-heads-heads", "r2-anchors-anchors", "r2-anchors-signals")
    ]
    assert sections == ["summary", "r1-heads-heads", "r2-anchors-anchors", "r2-anchors-signals"]
    nav = [a["href"] for a in page.find("a")][:4]
    assert nav == ["#summary", "#r1-heads-heads", "#r2-anchors-anchors", "#r2-anchors-signals"]
    runs_table = page.tables[0]
    assert [r[1] for r in runs_table.rows] == ["probe-heads", "anchors"]
    assert runs_table.rows[1][-1] == "Anchors, Signals"
    # Every embedded image is also a file, and the files open with Pillow.
    embedded = [base64.b64decode(img["src"].split(",", 1)[1]) for img in page.find("img")]
    pngs = sorted((out / "figs").glob("*.png"))
    assert len(pngs) == len(report.figures) == len(embedded) == 6
    assert sorted(p.read_bytes() for p in pngs) == sorted(embedded)
    for path in pngs:
        with Image.open(path) as im:
            im.verify()
    svgs = sorted((out / "figs").glob("*.svg"))
    assert {p.stem for p in svgs} == {
        "r1-heads-heads-drop",
        "r2-anchors-connectivity",
        "r2-anchors-signal-weights",
    }
    # The signals text: weights as planted (1 for anchors, 0 otherwise), anchors marked.
    weights_run = next(r for r in page.token_runs if "weights" in r.classes.split())
    assert all(cls == "m9" for cls, _ in weights_run.elements)
    html = (out / "report.html").read_text()
    assert html == report.html and html.startswith("<!DOCTYPE html>")


def test_hostile_text_is_escaped_everywhere(tmp_path) -> None:
    hostile_id = f"x{HOSTILE_IMG}"
    tokens = [" Look", HOSTILE_SCRIPT, " and", HOSTILE_IMG, "\x00\n", " $5 &amp;"] * 50
    run = write_anchors_run(
        tmp_path / "evil",
        num_samples=2,
        sample_ids=["s0", hostile_id],
        responses={"s0": tokens, hostile_id: tokens},
        argv=["vlmcredit", "anchors", "--out", HOSTILE_SCRIPT],
    )
    report = build_report([run.path])
    page = Page(report.html)
    _assert_self_contained(page)
    # Only our figures are images: histogram, two sample maps, signals histogram.
    assert len(page.find("img")) == 4
    text = page.all_text()
    assert HOSTILE_SCRIPT in text and HOSTILE_IMG in text and " $5 &amp;" in text
    assert f"Sample {hostile_id}" in text
    assert "\x00" not in report.html  # control characters shown as U+FFFD
    for run_ in page.token_runs:
        assert HOSTILE_SCRIPT in run_.text
    # Figure files get safe names even from a hostile sample id.
    names = list(report.figures)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names


def test_truncation_note(runs) -> None:
    planted = runs["anchors"]
    page = Page(build_report([planted.path], ReportOptions(samples=1, max_tokens=50)).html)
    assert "Truncated: showing the first 50 of 300 tokens (--max-tokens)." in page.all_text()
    first = page.token_runs[0]
    assert first.text == "".join(planted.samples[0].tokens[:50])


def test_registry_takes_new_run_types(runs, tmp_path) -> None:
    """A later command's section slots in by what its run contains (here: regions.json)."""
    import shutil

    from vlmcredit.reports.html import esc, section

    folder = tmp_path / "regions"
    shutil.copytree(runs["threshold"].path, folder)
    (folder / "regions.json").write_text('{"kept": 0.3}')

    def build(run, options) -> Section:
        kept = (run.path / "regions.json").read_text()
        anchor = f"{run.label}-regions"
        return Section("regions", "Regions", anchor, section(anchor, "Regions", [esc(kept)]))

    register_section(SectionBuilder("regions", "Regions", lambda r: r.has("regions.json"), build))
    try:
        page = Page(build_report([folder]).html)
    finally:
        unregister_section("regions")
    assert page.ids.index("r1-regions-anchors") < page.ids.index("r1-regions-regions")
    assert '{"kept": 0.3}' in page.all_text()
    assert "r1-regions-regions" not in Page(build_report([folder]).html).ids


def test_size_at_50_samples_of_2000_tokens(tmp_path) -> None:
    """The page stays small at 50 x 2,000 tokens: ~10 bytes per token, no per-token styles."""
    run = write_anchors_run(
        tmp_path / "big",
        num_samples=50,
        num_tokens=2000,
        images=(ImageSpec(6, 8, 320, 240),),
    )
    started = time.perf_counter()
    report = build_report([run.path], ReportOptions(samples=50, max_tokens=2000))
    seconds = time.perf_counter() - started
    html = report.html.encode()
    page = Page(report.html)
    tokens = 2 * 50 * 2000  # anchors text + signals text
    token_bytes = sum(
        len(m.encode())
        for m in re.findall(r'<div class="tokens[^"]*">.*?</div>', report.html, flags=re.S)
    )
    assert token_bytes > tokens * 3  # the pattern found the text (tokens are 2-8 characters)
    assert len(page.token_runs) == 100
    assert token_bytes / tokens < 14
    assert " style=" not in report.html  # no inline style blobs
    assert len(html) < 4_000_000
    print(
        f"\n50x2000 report: {len(html) / 1e6:.2f} MB html, {token_bytes / tokens:.1f} B/token "
        f"of text, {len(report.figures)} figures, built in {seconds:.1f} s"
    )


def test_png_is_decodable_and_deterministic(runs) -> None:
    a = build_report([runs["heads"].path]).figures
    b = build_report([runs["heads"].path]).figures
    for name in a:
        assert a[name].png == b[name].png
        assert a[name].svg == b[name].svg
        Image.open(io.BytesIO(a[name].png)).verify()


def test_optional_keys_and_columns_may_be_missing(runs, tmp_path) -> None:
    """Only the required columns/keys: histogram, cut and clusters come from the token table."""
    import json
    import shutil

    import pandas as pd

    folder = tmp_path / "minimal"
    shutil.copytree(runs["anchors"].path, folder)
    frame = pd.read_parquet(folder / "anchors.parquet")
    frame.drop(columns=["token_id", "weight", "threshold_anchor"]).to_parquet(
        folder / "anchors.parquet"
    )
    (folder / "anchors.json").write_text(json.dumps({"ratio_target": 0.15, "ratio_achieved": 0.2}))
    (folder / "signals.parquet").unlink()
    page = Page(build_report([folder], ReportOptions(samples=1)).html)
    _assert_self_contained(page)
    cut = frame.loc[frame["anchor"], "connectivity"].min()
    facts = {r[0]: r[1] for t in page.tables if not t.headers for r in t.rows}
    assert float(facts["cut (lowest anchor connectivity)"]) == pytest.approx(cut, rel=1e-3)
    assert facts["ratio target / achieved"] == "15.0% / 20.0%"
    assert any(t.headers[:1] == ["cluster"] for t in page.tables)


def test_zero_samples_keeps_the_run_level_figures(runs) -> None:
    page = Page(build_report([runs["anchors"].path], ReportOptions(samples=0)).html)
    assert not page.token_runs
    assert len(page.find("img")) == 2  # connectivity histogram, weight histogram
    assert "no rows" not in page.all_text()
