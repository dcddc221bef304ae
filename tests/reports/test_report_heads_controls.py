"""The heads section shows the controls, the threshold rule and the answer shares of heads.json."""

from __future__ import annotations

import json

import pytest

from tests.reports.page import Page
from vlmcredit.reports.report import build_report


def test_controls_rule_and_other_shares_beside_the_drops(report_runs) -> None:
    written = json.loads((report_runs.heads / "heads.json").read_text())
    page = Page(build_report([report_runs.heads]).html)
    text = page.all_text()
    rule = written["threshold_rule"]
    assert f"{rule['rule']}: {rule['formula']} ({rule['reason']})" in text
    controls = page.table("Controls from the same run")
    assert [r[0] for r in controls.rows] == [
        "baseline", "gray image (every image uniform gray)", "constant yes", "constant no",
    ]  # fmt: skip
    sources = [written["baseline"], *(written["controls"][k] for k in
               ("gray_image", "constant_yes", "constant_no"))]  # fmt: skip
    for row, source in zip(controls.rows, sources, strict=True):
        assert [float(v) for v in row[1:4]] == pytest.approx(
            [source[g] for g in ("total", "perception", "cognition")], abs=1e-3
        )
        assert float(row[4]) == pytest.approx(
            written["baseline"]["total"] - source["total"], abs=1e-3
        )
    gray_answers = written["controls"]["gray_image"]["answers"]
    assert float(controls.rows[1][5]) == pytest.approx(100 * gray_answers["other"], abs=1e-3)
    heads = page.table("Heads by drop")
    assert heads.headers[7:] == ["other %", "answers"]
    ranked = sorted(written["heads"], key=lambda h: -h["drop"]["total"])
    for row, h in zip(heads.rows, ranked, strict=True):
        assert float(row[7]) == pytest.approx(100 * h["answers"]["other"], abs=1e-3)
        assert row[8] == (f"all {h['answers']['constant']}" if h["answers"]["constant"] else "")
    constant = [h for h in written["heads"] if h["answers"]["constant"]]
    assert ("Collapsed to a constant answer" in text) == bool(constant)
    broken = [h for h in written["heads"] if h["answers"]["format_broken"]]
    assert ("not lost vision" in text) == bool(broken)
