"""`vlmcredit export RUN --format F --out DIR` through the real CLI, errors included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.formats.test_signals import TOKENIZER, meta, rows
from vlmcredit.cli.main import app
from vlmcredit.formats.run import Run
from vlmcredit.formats.signals import read_signals, write_signals

runner = CliRunner()


def make_run(path: Path) -> Path:
    """A real anchors-style run folder: Run manifest + signals written into it."""
    run = Run.open(
        path,
        "anchors",
        {"ratio": 0.15, "seed": 0},
        resume=False,
        extra={"checkpoint": {"id": "tiny", "tokenizer_sha1": TOKENIZER}},
    )
    write_signals(run.path, rows(), meta(), manifest=run.manifest)
    run.finish()
    return run.path


def heads_file(path: Path) -> Path:
    heads = {
        "mode": "head-index",
        "heads": [{"layer": None, "head": 0, "drop": {"total": 120.0}, "critical": True}],
        "critical": [{"layer": None, "head": 0}],
        "critical_heads": [0],
    }
    path.write_text(json.dumps(heads))
    return path


def assert_same_signals(a, b) -> None:
    assert list(a.frame.columns) == list(b.frame.columns)
    for ra, rb in zip(
        a.frame.itertuples(index=False), b.frame.itertuples(index=False), strict=True
    ):
        assert (ra.sample_id, ra.response_id) == (rb.sample_id, rb.response_id)
        for column in ("token_ids", "weight", "mask", "cluster_id"):
            x, y = getattr(ra, column), getattr(rb, column)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        assert ra.sample_weight == rb.sample_weight
    assert a.meta == b.meta


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "verl", "trl"])
def test_export_round_trip(tmp_path: Path, fmt: str) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / f"out-{fmt}"
    heads = heads_file(tmp_path / "heads.json")
    result = runner.invoke(
        app, ["export", str(run), "--format", fmt, "--out", str(out), "--heads", str(heads)]
    )
    assert result.exit_code == 0, result.output
    assert f"exported 3 responses (anchors) as {fmt}" in result.stdout
    table = "signals.jsonl" if fmt == "jsonl" else "signals.parquet"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [table, "manifest.json", "README.md", "heads.json"]
    )
    assert_same_signals(read_signals(out, tokenizer_sha1=TOKENIZER), read_signals(run))
    assert (out / "heads.json").read_bytes() == heads.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "export" and manifest["format"] == fmt
    assert manifest["source_run"]["command"] == "anchors"
    assert manifest["source_run"]["path"] == str(run.resolve())
    readme = (out / "README.md").read_text()
    assert "tokenizer" in readme and "all_tokens" in readme and "heads.json" in readme
    if fmt == "trl":
        assert "VlmCreditGRPOTrainer" in readme and f'signals="{out.resolve()}"' in readme
    if fmt == "verl":
        assert "trainer.v1.trainer_mode=vlmcredit" in readme
        assert f"+vlmcredit.signals={out.resolve()}" in readme
        assert "VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl" in readme
        assert "extra_info.sample_id" in readme
    if fmt == "jsonl":
        lines = (out / "signals.jsonl").read_text().splitlines()
        first = json.loads(lines[0])
        assert len(lines) == 3 and first["token_ids"] == rows()[0]["token_ids"]


def test_export_without_heads(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = runner.invoke(
        app, ["export", str(run), "--format", "verl", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "o" / "heads.json").exists()
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["heads"] is None


def test_export_errors_write_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"

    def fails(args: list[str], message: str) -> None:
        result = runner.invoke(app, ["export", *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    fails([str(run), "--format", "csv", "--out", str(out)], "--format csv: choose one of")
    fails([str(tmp_path / "nope"), "--out", str(out)], "not a run folder")
    capture = Run.open(tmp_path / "capture", "capture", {}, resume=False).path
    fails([str(capture), "--out", str(out)], "this capture run has no trainer signals")
    fails([str(run), "--out", str(out), "--heads", str(tmp_path / "x.json")], "no such file")
    (tmp_path / "bad-heads.json").write_text('{"other": 1}')
    bad_heads = str(tmp_path / "bad-heads.json")
    fails([str(run), "--out", str(out), "--heads", bad_heads], "not a usable heads.json")

    # A run whose table disagrees with its manifest is refused (validated before writing).
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["signals"]["num_rows"] = 5
    (run / "manifest.json").write_text(json.dumps(manifest))
    fails([str(run), "--out", str(out)], "the manifest says 5")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    result = runner.invoke(app, ["export", str(make_run(tmp_path / "run2")), "--out", str(taken)])
    assert result.exit_code == 2 and "exists and is not empty" in result.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    # An empty existing folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "run2"), "--out", str(empty)])
    assert result.exit_code == 0, result.output
    assert (empty / "signals.parquet").is_file()
