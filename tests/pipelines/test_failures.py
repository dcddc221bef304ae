"""Runs that fail are marked failed and never block the corrected command; outputs carry the
user's umask; an --out that is a file is refused in one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app

runner = CliRunner()
FAMILY = "qwen2.5-vl"


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("failure-rollouts")
    noise_image(84, 112, 5).save(folder / "a.png")
    rows = [
        {"id": f"r{i}", "images": ["a.png"], "prompt": "Describe.", "response": text}
        for i, text in enumerate(["A noisy picture of dots.", "Nothing but static here."])
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def test_a_failed_run_is_marked_and_the_corrected_command_runs(
    tiny_ckpt, rollouts, tmp_path
) -> None:
    out = tmp_path / "run"
    common = ["anchors", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts)]
    bad = _invoke(*common, "--out", str(out), "--sink", "topk", "--sink-k", "100000", "--quiet")
    assert bad.exit_code == 2, bad.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]
    assert not (out / "anchors.parquet").exists()
    # the same command again continues the failed run (and fails the same way, loudly)
    again = _invoke(*common, "--out", str(out), "--sink", "topk", "--sink-k", "100000", "--quiet")
    assert again.exit_code == 2 and "already holds a run" not in again.output
    # the corrected command starts over in the same folder, no --resume or new folder needed
    fixed = _invoke(*common, "--out", str(out), "--sink", "topk", "--sink-k", "2", "--quiet")
    assert fixed.exit_code == 0, fixed.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "error" not in manifest
    assert manifest["parameters"]["analysis"]["sink_k"] == 2
    # a finished run is still protected
    rerun = _invoke(*common, "--out", str(out), "--quiet")
    assert rerun.exit_code == 2 and "already holds a run" in rerun.output


@pytest.mark.parametrize("resume", [False, True], ids=["plain rerun", "--resume"])
def test_a_damaged_manifest_says_what_works(resume, tiny_ckpt, rollouts, tmp_path) -> None:
    """Not "rerun the command" (which met "already holds a run", whose --resume met the
    damaged manifest again): a new --out, or deleting the folder; the folder is left alone."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{damaged")
    args = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts)]
    result = _invoke(*args, "--out", str(out), "--quiet", *(["--resume"] if resume else []))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'manifest.json'}: unreadable")
    assert "cannot be continued; choose a new --out (or delete" in lines[0]
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "{damaged"


def test_a_failed_run_keeps_files_the_tool_did_not_write(tmp_path) -> None:
    from vlmcredit.formats.run import Run

    out = tmp_path / "run"
    run = Run.open(out, "anchors", {"a": 1}, resume=False)
    run.fail("boom")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="exists and is not a run folder"):
        Run.open(out, "anchors", {"a": 2}, resume=False)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["capture", "anchors", "weights"])
def test_out_that_is_a_file_is_one_line(command, tiny_ckpt, rollouts, tmp_path) -> None:
    target = tmp_path / "taken.txt"
    target.write_text("user data")
    result = _invoke(
        command, "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts), "--out", str(target)
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --out {target}: is a file; choose a folder for the run"
    ]
    assert target.read_text() == "user data"


def test_outputs_follow_the_users_umask(tiny_ckpt, rollouts, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        run = tmp_path / "w"
        args = ["--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts)]
        assert _invoke("weights", *args, "--out", str(run), "--quiet").exit_code == 0
        exported = tmp_path / "exp"
        assert _invoke("export", str(run), "--format", "trl", "--out", str(exported)).exit_code == 0
        page = tmp_path / "report.html"
        assert _invoke("report", str(run), "--out", str(page), "--quiet").exit_code == 0
        tiny = tmp_path / "tiny"
        assert _invoke("make-tiny", "--family", FAMILY, "--out", str(tiny)).exit_code == 0
    finally:
        os.umask(old)
    checked = 0
    for root in (run, exported, tmp_path / "report-figures", tiny):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
            checked += 1
    assert stat.S_IMODE(page.stat().st_mode) == 0o644
    assert checked > 10
