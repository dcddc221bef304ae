"""Errors the user's machine causes (no GPU, a filesystem that refuses writes) are one line,
exit 2, and leave nothing behind."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("env-rollouts")
    noise_image(56, 84, 1).save(folder / "a.png")
    path = folder / "rollouts.jsonl"
    row = {"id": "r0", "images": ["a.png"], "prompt": "Describe.", "response": "Dots."}
    path.write_text(json.dumps(row) + "\n")
    return path


# cuda:99 is missing on every machine (no GPU: "no CUDA GPU"; with GPUs: "only N visible")
@pytest.mark.parametrize("device", ["cuda:99", "tpu", "bogus:x"])
@pytest.mark.parametrize("command", ["capture", "anchors", "weights"])
def test_missing_device_is_one_line(command, device, tiny_ckpt, rollouts, tmp_path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [command, "--ckpt", str(tiny_ckpt("qwen2.5-vl")), "--data", str(rollouts),
         "--out", str(out), "--device", device, "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device}:")
    assert not out.exists()


def test_a_filesystem_that_refuses_writes_is_one_line(tiny_ckpt, rollouts) -> None:
    out = Path("/sys/vlmcredit-test-run")  # sysfs refuses new folders, even to root
    result = runner.invoke(
        app,
        ["weights", "--ckpt", str(tiny_ckpt("qwen2.5-vl")), "--data", str(rollouts),
         "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}:"), lines
    assert "choose a folder you can write" in lines[0]


def test_a_write_refused_mid_run_names_the_file(tiny_ckpt, rollouts, tmp_path) -> None:
    """A write the system refuses halfway through a run (here a file-size limit, EFBIG; a full
    disk, ENOSPC, takes the same path) is one line naming the file being written, not
    "output"; the run is marked failed, and the same command then continues it."""
    out = tmp_path / "run"
    args = ["capture", "--ckpt", str(tiny_ckpt("qwen2.5-vl")), "--data", str(rollouts)]
    args += ["--out", str(out), "--quiet"]

    def small_files() -> None:  # in the child: files may not grow past 4 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    cmd = [sys.executable, "-m", "vlmcredit.cli.main", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {out / 'shard-00000.safetensors'}: File too large; ")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and not list(out.glob(".*.*"))  # no partial file
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
