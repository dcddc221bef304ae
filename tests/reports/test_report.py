"""The report from heads, anchors and signals runs: sections, numbers, figures, escaping, size."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.reports.conftest import HOSTILE_ID, HOSTILE_IMG, HOSTILE_SCRIPT
from tests.reports.page import Page, png_of
from vlmcredit.reports.report import build_report, write_report
from vlmcredit.reports.sections import (
    ReportOptions,
    Section,
    SectionBuilder,
    register_section,
    unregister_section,
)


def heads_of(run: Path) -> dict:
    """What probe-heads wrote (the independent reference the report must show)."""
    return json.loads((run / "heads.json").read_text())


def tokens_of(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "anchors.parquet")


def samples_of(run: Path) -> list[tuple[str, pd.DataFrame]]:
    """(sample id, its token rows) in the run's order."""
    tokens = tokens_of(run)
    return [(str(sid), part) for sid, part in tokens.groupby("sample_id", sort=False)]


@pytest.fixture(scope="module")
def both(report_runs, tmp_path_factory) -> tuple[Page, Path, object]:
    """One report of a heads run and an anchors run (with signals), written to disk."""
    out = tmp_path_factory.mktemp("report-both")
    report = build_report([report_runs.heads, report_runs.anchors])
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


def _critical_names(heads: dict) -> str:
    critical = sorted(
        (h for h in heads["heads"] if h["critical"]),
        key=lambda h: (-1 if h["layer"] is None else h["layer"], h["head"]),
    )
    names = [
        f"L{h['layer']} H{h['head']}" if h["layer"] is not None else f"H{h['head']}"
        for h in critical
    ]
    return ", ".join(names) or "none"


def test_heads_head_index_section(report_runs) -> None:
    written = heads_of(report_runs.heads)
    report = build_report([report_runs.heads])
    page = Page(report.html)
    _assert_self_contained(page)
    assert {"summary", "r1-heads-heads"} <= set(page.ids)
    text = page.all_text()
    assert written["mode"] == "head-index"
    assert f"critical heads{_critical_names(written)}" in text
    assert f"total {written['baseline']['total']:.1f}" in text
    assert f"total drop > {written['threshold']:g}" in text
    # Head table sorted by drop (stable), the critical flag as probe-heads set it.
    heads = page.table("Heads by drop")
    ranked = sorted(written["heads"], key=lambda h: -h["drop"]["total"])
    assert [int(r[1]) for r in heads.rows] == [h["head"] for h in ranked]
    assert [float(r[2]) for r in heads.rows] == pytest.approx(
        [h["drop"]["total"] for h in ranked], abs=1e-3
    )
    assert [r[6] == "critical" for r in heads.rows] == [h["critical"] for h in ranked]
    # Per-subtask drop of each critical head = baseline score - ablated score (from the file).
    sub = page.table("Per subtask")
    assert [r[0] for r in sub.rows] == written["categories"]
    shown = [h for h in ranked if h["critical"]][:8]
    assert sub.headers[4:] == [f"drop H{h['head']}" for h in shown]
    for row in sub.rows:
        base = written["baseline"]["subtasks"][row[0]]["score"]
        assert float(row[3]) == pytest.approx(base, abs=1e-3)
        for h, value in zip(shown, row[4:], strict=True):
            assert float(value) == pytest.approx(base - h["subtasks"][row[0]], abs=1e-3)
    imgs = page.find("img")
    assert len(imgs) == 1 and png_of(imgs[0]).size[0] > 300
    assert report.figures["r1-heads-heads-drop"].svg.startswith(b"<?xml")


def test_heads_layer_head_grid(report_runs) -> None:
    written = heads_of(report_runs.layer_head)
    page = Page(build_report([report_runs.layer_head]).html)
    _assert_self_contained(page)
    assert written["mode"] == "layer-head"
    flags = {h["critical"] for h in written["heads"]}
    assert flags == {True, False}  # the fixture's threshold splits the measured drops
    assert f"critical heads{_critical_names(written)}" in page.all_text()
    table = page.table("Heads by drop")
    assert len(table.rows) == len(written["heads"]) == 4  # layer 1 x 4 heads
    assert sorted((int(r[0]), int(r[1])) for r in table.rows) == sorted(
        (h["layer"], h["head"]) for h in written["heads"]
    )


def test_anchors_section_tokens_clusters_and_maps(report_runs) -> None:
    run = report_runs.anchors
    samples = samples_of(run)
    summary = json.loads((run / "anchors.json").read_text())
    assert [sid for sid, _ in samples] == ["s0", "s1", "s2"]
    report = build_report([run], ReportOptions(samples=2))
    page = Page(report.html)
    _assert_self_contained(page)
    assert "r1-anchors-anchors" in page.ids
    text = page.all_text()
    assert "Showing 2 of 3 samples" in text
    # Shading reference: buckets by the hand formula over the whole run's connectivity.
    values = tokens_of(run)["connectivity"].to_numpy(np.float64)
    lo, hi = values.min(), np.quantile(values, 0.995)
    anchor_runs = [r for r in page.token_runs if "weights" not in r.classes.split()]
    assert len(anchor_runs) == 2
    for run_, (_sid, tokens) in zip(anchor_runs, samples[:2], strict=True):
        assert run_.text == "".join(tokens["token"])
        expected = []
        for token, c, a in zip(
            tokens["token"], tokens["connectivity"], tokens["anchor"], strict=True
        ):
            k = int(np.clip(np.floor((float(c) - lo) / (hi - lo) * 10), 0, 9))
            if a:
                expected.append((f"m{k}", token))
            elif k:
                expected.append((f"s{k}", token))
        assert run_.elements == expected
        assert sum(cls.startswith("m") for cls, _ in run_.elements) == int(tokens["anchor"].sum())
    # Cluster table of sample s0: sizes and mean connectivity from the token table, the anchor
    # flag as anchors.json records it.
    s0 = samples[0][1]
    stored = {c["id"]: c for c in summary["samples"][0]["clusters"]}
    table = next(
        t for t in page.tables if t.headers[:3] == ["cluster", "tokens", "mean connectivity"]
    )
    assert sorted(int(r[0]) for r in table.rows) == sorted(set(s0["cluster"]))
    for row in table.rows:
        members = s0[s0["cluster"] == int(row[0])]
        assert int(row[1]) == len(members) == stored[int(row[0])]["size"]
        assert float(row[2]) == pytest.approx(float(members["connectivity"].mean()), rel=1e-3)
        taken, size = int(members["anchor"].sum()), len(members)
        assert stored[int(row[0])]["anchor"] == (taken > 0)
        # whole clusters say yes / no; the one the fill split says how much of it is anchors
        want = "no" if not taken else "yes" if taken == size else f"{taken} of {size} anchors"
        assert row[3] == want
    means = [float(r[2]) for r in table.rows]
    assert means == sorted(means, reverse=True)
    # Histogram + one attention map per shown sample (s0 spans both its images, on thumbnails).
    imgs = page.find("img")
    assert len(imgs) == 1 + 2 + 1  # histogram, 2 samples, signals weights
    two_images, one_image = png_of(imgs[1]), png_of(imgs[2])
    assert two_images.size[0] > 400 and two_images.size[0] > one_image.size[0]
    assert "No thumbnail stored" not in text
    assert "cut (lowest anchor connectivity)" in text
    facts = {r[0]: r[1] for t in page.tables if not t.headers for r in t.rows}
    spread = summary["ratio_per_response"]
    assert facts["anchor share per response"].startswith(
        f"min {spread['min']:.1%} · median {spread['median']:.1%} · max {spread['max']:.1%}; "
        f"{spread['within_tolerance']:.0%} of 3 within ±2 points of the target"
    )
    assert (facts["analysis.ratio_scope"], facts["analysis.fill"]) == (
        "response",
        "clusters-then-tokens",
    )
    cut = summary["connectivity"]["cut"]
    assert f"{cut:.3g}"[:4] in text


def test_threshold_mode_without_thumbs(report_runs) -> None:
    page = Page(build_report([report_runs.threshold]).html)
    _assert_self_contained(page)
    text = page.all_text()
    assert "threshold (top ratio)" in text
    assert "No thumbnail stored: cells drawn on a blank canvas." in text
    assert not any(t.headers[:1] == ["cluster"] for t in page.tables)  # no clusters to list
    assert "r1-anchors-thr-signals" in page.ids  # anchors always writes the trainer signals


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
    assert len(pngs) == len(report.figures) == len(embedded) == 6  # heads, hist, 3 maps, weights
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
    # The signals text: weight 1 on anchors, --other-weight 0 elsewhere, anchors marked.
    weights_run = next(r for r in page.token_runs if "weights" in r.classes.split())
    assert weights_run.elements and all(cls == "m9" for cls, _ in weights_run.elements)
    html = (out / "report.html").read_text()
    assert html == report.html and html.startswith("<!DOCTYPE html>")


def test_hostile_text_is_escaped_everywhere(report_runs) -> None:
    run = report_runs.hostile
    assert [sid for sid, _ in samples_of(run)] == ["s0", HOSTILE_ID]
    report = build_report([run])
    page = Page(report.html)
    _assert_self_contained(page)
    # Only our figures are images: histogram, two sample maps, signals histogram.
    assert len(page.find("img")) == 4
    text = page.all_text()
    assert HOSTILE_SCRIPT in text and HOSTILE_IMG in text and " $5 &amp;" in text
    assert f"Sample {HOSTILE_ID}" in text
    assert f"--out {shlex.quote(str(run))}" in text  # the command line, hostile folder name
    assert "\x00" not in report.html  # control characters shown as U+FFFD
    assert len(page.token_runs) == 4  # anchors and signals text of both samples
    for run_ in page.token_runs:
        assert HOSTILE_SCRIPT in run_.text
    # Figure files and ids get safe names even from a hostile sample id and folder name.
    names = list(report.figures)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in page.ids), page.ids


def test_truncation_note(report_runs) -> None:
    (_sid, tokens), *_ = samples_of(report_runs.anchors)
    assert len(tokens) > 50
    page = Page(build_report([report_runs.anchors], ReportOptions(samples=1, max_tokens=50)).html)
    note = f"Truncated: showing the first 50 of {len(tokens)} tokens (--max-tokens)."
    assert note in page.all_text()
    assert page.token_runs[0].text == "".join(tokens["token"][:50])


def test_registry_takes_new_run_types(report_runs, tmp_path) -> None:
    """A later command's section slots in by what its run contains (here: regions.json)."""
    import shutil

    from vlmcredit.reports.html import esc, section

    folder = tmp_path / "regions"
    shutil.copytree(report_runs.anchors, folder)
    (folder / "regions.json").write_text('{"kept": 0.3}')

    def build(run, options) -> Section:
        kept = (run.path / "regions.json").read_text()
        anchor = f"{run.label}-regions"
        return Section("regions", "Regions", anchor, section(anchor, "Regions", [esc(kept)]))

    register_section(SectionBuilder("regions", "Regions", lambda r: r.has("regions.json"), build))
    try:
        page = Page(build_report([folder], ReportOptions(samples=0)).html)
    finally:
        unregister_section("regions")
    assert page.ids.index("r1-regions-anchors") < page.ids.index("r1-regions-regions")
    assert '{"kept": 0.3}' in page.all_text()
    assert (
        "r1-regions-regions" not in Page(build_report([folder], ReportOptions(samples=0)).html).ids
    )


def test_size_per_token_and_at_50_samples_of_2000_tokens(report_runs) -> None:
    """~10 bytes per token of text, no per-token styles, and 50 x 2,000 tokens stays < 4 MB.

    The run holds two responses of ~2,000 tokens; the page at 50 such samples is extrapolated
    from the cost of one more sample (text + attention map), scaled up to 2,000 tokens.
    """
    run = report_runs.threshold
    samples = samples_of(run)
    per_sample = [len(t) for _, t in samples]
    assert len(samples) == 2 and min(per_sample) > 1500
    started = time.perf_counter()
    report = build_report([run], ReportOptions(samples=2, max_tokens=4000))
    seconds = time.perf_counter() - started
    one = build_report([run], ReportOptions(samples=1, max_tokens=4000)).html.encode()
    html = report.html.encode()
    page = Page(report.html)
    tokens = 2 * sum(per_sample)  # anchors text + signals text
    token_bytes = sum(
        len(m.encode())
        for m in re.findall(r'<div class="tokens[^"]*">.*?</div>', report.html, flags=re.S)
    )
    assert token_bytes > tokens * 3  # the pattern found the text (tokens are 1-8 characters)
    assert len(page.token_runs) == 4
    assert token_bytes / tokens < 14
    assert " style=" not in report.html  # no inline style blobs
    sample_bytes = (len(html) - len(one)) * max(1.0, 2000 / per_sample[1])
    at_50 = len(one) - sample_bytes + 50 * sample_bytes
    assert at_50 < 4_000_000
    print(
        f"\n2 x {per_sample} tokens report: {len(html) / 1e6:.2f} MB html, "
        f"{token_bytes / tokens:.1f} B/token of text; ~{at_50 / 1e6:.2f} MB at 50 x 2,000; "
        f"built in {seconds:.1f} s"
    )


def test_png_is_decodable_and_deterministic(report_runs) -> None:
    a = build_report([report_runs.heads]).figures
    b = build_report([report_runs.heads]).figures
    for name in a:
        assert a[name].png == b[name].png
        assert a[name].svg == b[name].svg
        Image.open(io.BytesIO(a[name].png)).verify()


def test_optional_keys_and_columns_may_be_missing(report_runs, tmp_path) -> None:
    """Only the required columns/keys: histogram, cut and clusters come from the token table."""
    import shutil

    folder = tmp_path / "minimal"
    shutil.copytree(report_runs.anchors, folder)
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
    assert facts["anchor share per response"] == "not recorded (run from an older vlmcredit)"
    assert any(t.headers[:1] == ["cluster"] for t in page.tables)


def test_zero_samples_keeps_the_run_level_figures(report_runs) -> None:
    page = Page(build_report([report_runs.anchors], ReportOptions(samples=0)).html)
    assert not page.token_runs
    assert len(page.find("img")) == 2  # connectivity histogram, weight histogram
    assert "no rows" not in page.all_text()
