"""`vlmcredit demo` runs the whole user path offline on the built-in tiny model."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd
from typer.testing import CliRunner

from vlmcredit.cli.main import app
from vlmcredit.formats.signals import read_signals


def test_demo_runs_the_whole_path(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    for step in ("synthetic MME", "vision-critical heads", "anchor tokens", "export", "report"):
        assert step in result.stdout
    assert "builtin:tiny-qwen2.5-vl" in result.stdout
    heads = json.loads((tmp_path / "runs" / "heads" / "heads.json").read_text())
    assert len(heads["heads"]) == 8  # one configuration per head index of the built-in model
    # the documented default rule for a partial MME, printed, not a number fitted to the result
    rule = heads["threshold_rule"]
    gap = heads["baseline"]["total"] - heads["controls"]["gray_image"]["total"]
    assert rule["rule"] == "relative" and heads["threshold"] == 0.5 * gap > 0
    assert f"threshold rule: relative ({rule['reason']})" in result.stdout
    assert rule["formula"] in result.stdout
    assert heads["critical_heads"] == [
        h["head"] for h in heads["heads"] if h["drop"]["total"] > 0.5 * gap
    ]
    for h in heads["heads"]:  # controls and answer shares printed beside every drop
        assert f"head {h['head']}: drop {h['drop']['total']:.1f}" in result.stdout
    assert "controls: gray image" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "anchors" / "manifest.json").read_text())
    # the critical heads, or every head index when none passed the threshold
    every_head = [h["head"] for h in heads["heads"]]
    assert manifest["attention"]["heads"] == (heads["critical_heads"] or every_head)
    rollouts = [
        json.loads(x) for x in (tmp_path / "data" / "rollouts.jsonl").read_text().splitlines()
    ]
    anchors = pd.read_parquet(tmp_path / "runs" / "anchors" / "anchors.parquet")
    assert anchors.sample_id.nunique() == len(rollouts) == 8 and anchors.anchor.any()
    for method in ("kawhi", "tor", "vppo", "entropy", "sayo"):  # every other weight method
        assert len(read_signals(tmp_path / "runs" / "weights" / method).frame) == 8
    pairs = json.loads((tmp_path / "runs" / "compare" / "compare.json").read_text())["pairs"]
    assert {p["b"] for p in pairs if p["a"] == "anchors"} >= {"kawhi", "tor", "vppo"}
    for fmt in ("verl", "trl"):
        signals = read_signals(tmp_path / f"export-{fmt}")
        assert len(signals.frame) == 8
        assert (tmp_path / f"export-{fmt}" / "README.md").is_file()
    report = (tmp_path / "report.html").read_text()
    HTMLParser().feed(report)
    assert str(tmp_path / "report.html") in result.stdout
    # A second run starts afresh (stale runs are replaced, the checkpoint is reused).
    again = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output


def test_demo_never_touches_a_folder_it_did_not_make(tmp_path) -> None:
    user = tmp_path / "project"
    (user / "data").mkdir(parents=True)
    (user / "data" / "train.jsonl").write_text("keep\n")
    result = CliRunner().invoke(app, ["demo", "--out", str(user)])
    assert result.exit_code == 2
    assert "was not made by `vlmcredit demo`" in result.output
    assert (user / "data" / "train.jsonl").read_text() == "keep\n"
    assert sorted(p.name for p in user.iterdir()) == ["data"]
