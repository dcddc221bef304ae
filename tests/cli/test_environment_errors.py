"""Errors the user's machine causes (no GPU, a filesystem that refuses writes) are one line,
exit 2, and leave nothing behind."""

from __future__ import annotations

import json
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
