"""`vlmcredit report` through the CLI: files written, and one-line errors with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.reports.page import Page
from vlmcredit.cli.main import app
from vlmcredit.formats.run import Run

runner = CliRunner()


@pytest.fixture(scope="module")
def good(report_runs) -> dict[str, Path]:
    return {
        "heads": report_runs.heads,
        "anchors": report_runs.anchors,
        "capture": report_runs.capture,
    }


def _first_sample_tokens(run: Path) -> int:
    tokens = pd.read_parquet(run / "anchors.parquet")
    return int((tokens["sample_id"] == tokens["sample_id"].iloc[0]).sum())


def _report(*args: str):
    return runner.invoke(app, ["report", *args, "--quiet"])


def test_cli_writes_html_and_figures(good, tmp_path) -> None:
    out = tmp_path / "out" / "report.html"
    result = _report(
        str(good["heads"]),
        str(good["anchors"]),
        "--out",
        str(out),
        "--png-dir",
        str(tmp_path / "pngs"),
        "--samples",
        "1",
        "--max-tokens",
        "40",
        "--title",
        "My <b>runs</b>",
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "figures" in result.stdout
    page = Page(out.read_text())
    assert "My <b>runs</b>" in page.all_text() and not page.find("b")
    first = _first_sample_tokens(good["anchors"])
    assert f"Truncated: showing the first 40 of {first} tokens" in page.all_text()
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(pngs) == len(page.find("img")) == 4  # heads, histogram, 1 sample map, weights
    for png in pngs:
        with Image.open(png) as im:
            im.verify()


def test_cli_default_figure_folder(good, tmp_path) -> None:
    out = tmp_path / "r.html"
    result = _report(str(good["heads"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "r-figures").iterdir()) == [
        "r1-heads-heads-drop.png",
        "r1-heads-heads-drop.svg",
    ]


def _broken_anchors(root: Path, name: str, good: Path) -> Path:
    folder = root / name
    shutil.copytree(good, folder)
    return folder


def _cases(good: dict[str, Path], root: Path) -> list[tuple[list[str], str]]:
    """(arguments, fragment the one-line error must contain)."""
    empty = root / "empty"
    empty.mkdir(parents=True)
    no_cols = _broken_anchors(root, "no-cols", good["anchors"])
    frame = pd.read_parquet(no_cols / "anchors.parquet").drop(columns=["connectivity"])
    frame.to_parquet(no_cols / "anchors.parquet")
    short = _broken_anchors(root, "short", good["anchors"])
    frame = pd.read_parquet(short / "anchors.parquet")
    frame.drop(index=frame.index[-1]).to_parquet(short / "anchors.parquet")
    last = str(frame["sample_id"].iloc[-1])  # its attention keeps the row the table lost
    t, n = Run.load(good["anchors"]).tensors(last)["attention"].shape
    assert t == (frame["sample_id"] == last).sum()
    no_json = _broken_anchors(root, "no-json", good["anchors"])
    (no_json / "anchors.json").unlink()
    bad_heads = root / "bad-heads"
    shutil.copytree(good["heads"], bad_heads)
    heads = json.loads((bad_heads / "heads.json").read_text())
    del heads["threshold"]
    (bad_heads / "heads.json").write_text(json.dumps(heads))
    no_shard = _broken_anchors(root, "no-shard", good["anchors"])
    for shard in no_shard.glob("shard-*.safetensors"):
        shard.unlink()
    return [
        ([str(root / "missing")], "no such run folder"),
        ([str(empty)], "not a run folder (no manifest.json)"),
        ([str(good["capture"])], "nothing to report"),
        ([str(no_cols)], "anchors.parquet: missing column(s) connectivity"),
        ([str(short)], f"sample '{last}': attention has shape ({t}, {n}), expected ({t - 1}, N)"),
        ([str(no_json)], "missing anchors.json"),
        ([str(bad_heads)], "heads.json: not a usable heads.json (missing key 'threshold')"),
        ([str(no_shard)], "missing shard-00000.safetensors (sample 's0')"),
        ([str(good["heads"]), "--max-tokens", "0"], "--max-tokens 0"),
        ([str(good["heads"]), "--samples", "-1"], "--samples -1"),
    ]


def test_cli_errors_are_one_line_and_write_nothing(good, tmp_path) -> None:
    for args, fragment in _cases(good, tmp_path / "cases"):
        out = tmp_path / "o" / "report.html"
        result = _report(*args, "--out", str(out))
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert fragment in lines[0], (fragment, lines[0])
        assert not (tmp_path / "o").exists()  # no HTML, no figure folder


def test_cli_out_is_a_folder(good, tmp_path) -> None:
    result = _report(str(good["heads"]), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a folder" in result.stderr


def test_cli_refuses_a_run_twice_and_warns_of_mixed_checkpoints(good, tmp_path) -> None:
    heads = str(good["heads"])
    twice = _report(heads, heads + "/", "--out", str(tmp_path / "twice.html"))
    assert twice.exit_code == 2 and "given twice (as r1-heads and r2-heads)" in twice.stderr
    assert not (tmp_path / "twice.html").exists()
    # the same run as if made with other weights: reported, and said on stderr and the page
    other = tmp_path / "other"
    shutil.copytree(good["heads"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["checkpoint"]["weights_sha1"] = "f" * 40
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "mixed.html"
    mixed = _report(heads, str(other), "--out", str(out))
    assert mixed.exit_code == 0, mixed.output
    assert mixed.stderr.startswith("warning: the runs come from 2 different checkpoints")
    assert "weights ffffffff" in mixed.stderr
    assert "2 different checkpoints" in Page(out.read_text()).all_text()
    one = _report(heads, "--out", str(tmp_path / "one.html"))
    assert one.exit_code == 0 and "warning" not in one.stderr


def test_cli_replaces_its_own_report_only(good, tmp_path) -> None:
    out = tmp_path / "report.html"
    for _ in range(2):  # a report of ours is replaced
        result = _report(str(good["heads"]), "--out", str(out))
        assert result.exit_code == 0, result.output
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    refused = _report(str(good["heads"]), "--out", str(mine))
    assert refused.exit_code == 2 and "exists and is not a vlmcredit report" in refused.stderr
    assert mine.read_text() == "<p>my notes</p>" and not (tmp_path / "notes-figures").exists()
    (tmp_path / "report-figures" / "todo.txt").write_text("mine")
    taken = _report(str(good["heads"]), "--out", str(out))
    assert taken.exit_code == 2 and "not report figures (todo.txt)" in taken.stderr
