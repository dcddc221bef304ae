"""`vlmcredit compare --ckpt A --ckpt B --data ... --mme ...` end to end on two tiny checkpoints:
the sub-runs, the comparison read back against the sub-runs' own tables, resume, the same result
from the finished runs (--anchors-run / --heads-run), the report section, and mismatched runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.analysis.anchors import agreement
from vlmcredit.analysis.connectivity import bimodality_coefficient
from vlmcredit.cli.main import app
from vlmcredit.formats.checkpoints import read_checkpoints
from vlmcredit.formats.heads import read_heads

runner = CliRunner()
FAMILY = "qwen2.5-vl"
RESPONSES = [
    "The red square sits on the left and a blue circle on the right side of it.",
    "Small coloured dots everywhere, like static on an old television set.",
    "No, there is nothing here but random pixels.",
]


def _cli(*args: str):
    argv = sys.argv
    sys.argv = ["vlmcredit", *args]
    try:
        return runner.invoke(app, list(args))
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints (seeds 0 and 1), rollouts and a 4-question MME set."""
    from vlmcredit.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("ckpt-compare")
    mme = root / "mme"
    result = _cli(
        "mme-synth", "--out", str(mme), "--images-per-category", "1", "--seed", "0",
        "--categories", "existence,count",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt_a = tiny_ckpt(FAMILY)  # seed 0, shared with the other tests
    ckpt_b = make_tiny(FAMILY, root / "seed1", seed=1)
    data = root / "data"
    data.mkdir()
    noise_image(84, 112, 3).save(data / "a.png")
    noise_image(112, 84, 4).save(data / "b.png")
    rows = [
        {"id": f"s{i}", "images": ["a.png" if i % 2 else "b.png"], "prompt": "Describe.",
         "response": text}
        for i, text in enumerate(RESPONSES)
    ]  # fmt: skip
    rollouts = data / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"a": ckpt_a, "b": ckpt_b, "mme": mme, "data": rollouts, "root": root}


def _compare_ckpts(setup, out: Path, *extra: str):
    return _cli(
        "compare", "--ckpt", str(setup["a"]), "--ckpt", str(setup["b"]), "--data",
        str(setup["data"]), "--mme", str(setup["mme"]), "--out", str(out), "--dtype", "fp32",
        "--quiet", *extra,
    )  # fmt: skip


def test_compare_checkpoints_end_to_end(setup, tmp_path) -> None:
    out = tmp_path / "cmp"
    result = _compare_ckpts(setup, out)
    assert result.exit_code == 0, result.output
    assert f"{FAMILY} -> seed1: bimodality" in result.output
    for sub in ("ckpt-0/anchors", "ckpt-1/anchors", "ckpt-0/heads", "ckpt-1/heads"):
        assert json.loads((out / sub / "manifest.json").read_text())["status"] == "finished"
    cmp = read_checkpoints(out)
    assert cmp["source"] == "checkpoints" and [c["label"] for c in cmp["checkpoints"]] == [
        FAMILY,
        "seed1",
    ]

    # every figure equals the one computed here from the sub-runs' own tables
    tables = [pd.read_parquet(out / f"ckpt-{k}/anchors/anchors.parquet") for k in (0, 1)]
    for table, c in zip(tables, cmp["checkpoints"], strict=True):
        conn = table["connectivity"].to_numpy(np.float64)
        assert c["anchors"]["anchor_share"] == pytest.approx(table["anchor"].mean())
        assert c["anchors"]["connectivity_median"] == pytest.approx(np.median(conn))
        assert c["anchors"]["bimodality_coefficient"] == pytest.approx(bimodality_coefficient(conn))
    merged = tables[0].merge(tables[1], on=["sample_id", "token_index"], suffixes=("_a", "_b"))
    assert len(merged) == len(tables[0]) == len(tables[1]) > 0
    (pair,) = cmp["pairs"]
    overlap = agreement(merged["anchor_a"].to_numpy(), merged["anchor_b"].to_numpy())
    assert pair["anchors"]["jaccard"] == pytest.approx(overlap["jaccard"])
    assert pair["anchors"]["precision"] == pytest.approx(overlap["precision"])
    bc = [c["anchors"]["bimodality_coefficient"] for c in cmp["checkpoints"]]
    assert pair["anchors"]["bimodality_coefficient_change"] == pytest.approx(bc[1] - bc[0])
    heads = [read_heads(out / f"ckpt-{k}/heads", full=True) for k in (0, 1)]
    pairs = zip(heads[0]["heads"], heads[1]["heads"], strict=True)
    want = [h1["drop"]["total"] - h0["drop"]["total"] for h0, h1 in pairs]
    assert [h["change"] for h in pair["heads"]["heads"]] == pytest.approx(want)
    assert len(want) == 4  # one per head of the tiny model (head-index mode)
    base = [h["baseline"]["total"] for h in heads]
    assert pair["heads"]["baseline_change"] == pytest.approx(base[1] - base[0])
    frame = pd.read_parquet(out / "checkpoint_heads.parquet")
    assert frame.loc[frame["label"] == "seed1", "change"].tolist() == pytest.approx(want)
    assert pd.read_parquet(out / "checkpoints.parquet")["label"].tolist() == [FAMILY, "seed1"]

    # a rerun needs --resume, and then reuses the finished sub-runs as they are
    again = _compare_ckpts(setup, out)
    assert again.exit_code == 2 and "--resume" in again.output
    manifests = {p: p.read_text() for p in out.glob("ckpt-*/*/manifest.json")}
    again = _compare_ckpts(setup, out, "--resume")
    assert again.exit_code == 0, again.output
    assert {p: p.read_text() for p in manifests} == manifests
    assert read_checkpoints(out)["pairs"] == cmp["pairs"]

    # the same comparison from the finished runs
    runs = []
    for k in (0, 1):
        runs += ["--anchors-run", str(out / f"ckpt-{k}/anchors")]
    for k in (0, 1):
        runs += ["--heads-run", str(out / f"ckpt-{k}/heads")]
    from_runs = _cli("compare", *runs, "--out", str(tmp_path / "from-runs"), "--quiet")
    assert from_runs.exit_code == 0, from_runs.output
    again = read_checkpoints(tmp_path / "from-runs")
    assert again["source"] == "runs" and again["pairs"] == cmp["pairs"]

    # the report shows the section
    page = tmp_path / "report.html"
    report = _cli("report", str(out), "--out", str(page), "--quiet")
    assert report.exit_code == 0, report.output
    html = page.read_text()
    assert "Checkpoint comparison" in html and "anchor jaccard" in html and "drop @ seed1" in html


def test_runs_over_other_rollouts_are_refused(setup, tmp_path) -> None:
    ck = ["--ckpt", str(setup["a"]), "--dtype", "fp32", "--quiet"]
    all3, first2 = tmp_path / "all", tmp_path / "first2"
    for out, extra in ((all3, []), (first2, ["--max-samples", "2"])):
        result = _cli("anchors", *ck, "--data", str(setup["data"]), "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
    bad = _cli(
        "compare", "--anchors-run", str(all3), "--anchors-run", str(first2), "--out",
        str(tmp_path / "cmp"),
    )  # fmt: skip
    assert bad.exit_code == 2
    line = bad.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"{first2}: does not hold the same rollouts as {all3}" in line
    assert "sample 's2' is only in" in line and "same --data" in line
    assert not (tmp_path / "cmp").exists()  # refused before anything is written
    # methods and checkpoints at once, or a single checkpoint: one-line errors
    mixed = _cli("compare", str(all3), "--anchors-run", str(all3), "--out", str(tmp_path / "m"))
    assert mixed.exit_code == 2 and "not both" in mixed.output
    alone = _cli("compare", "--ckpt", str(setup["a"]), "--out", str(tmp_path / "one"))
    assert alone.exit_code == 2 and "at least two" in alone.output
