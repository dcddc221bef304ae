"""`vlmcredit demo` runs offline end to end on the built-in tiny model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vlmcredit.cli.main import app


def test_demo_runs_and_writes_a_capture_run(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "[3/3] vlmcredit capture" in result.stdout
    assert "most image-attentive" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "capture" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["samples_done"] == 2
    # A second run reuses the checkpoint and starts the capture afresh.
    again = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output
