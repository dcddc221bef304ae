"""`vlmcredit info` and `make-tiny` through the real CLI, including the error frame."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.helpers import FAMILIES
from tests.models.test_loading import broken_checkpoints
from vlmcredit.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("family", FAMILIES)
def test_info_json_every_family(tiny_ckpt, family: str) -> None:
    result = runner.invoke(app, ["info", "--ckpt", str(tiny_ckpt(family)), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == family
    assert (facts["layers"], facts["heads"], facts["kv_heads"], facts["head_dim"]) == (3, 4, 2, 16)
    assert facts["vision_merge_size"] == 2
    assert facts["vision_patch_size"] == (16 if family.startswith("qwen3") else 14)
    assert facts["dtype"] == "fp32"
    # Parameter count from headers equals the loaded model's.
    from vlmcredit.models.loading import load_checkpoint

    model = load_checkpoint(tiny_ckpt(family)).model
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())


def test_info_text(tiny_ckpt) -> None:
    result = runner.invoke(app, ["info", "--ckpt", str(tiny_ckpt("qwen3-vl"))])
    assert result.exit_code == 0
    assert "qwen3-vl" in result.stdout and "kv_heads" in result.stdout


def test_info_errors_exit_2_with_one_line(tiny_ckpt, tmp_path) -> None:
    cases = broken_checkpoints(tiny_ckpt("qwen2-vl"), tmp_path)
    for name, (folder, fragment) in cases.items():
        result = runner.invoke(app, ["info", "--ckpt", str(folder)])
        assert result.exit_code == 2, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], name
        assert "Traceback" not in result.output


def test_debug_shows_traceback_in_a_real_process(tmp_path) -> None:
    cmd = [sys.executable, "-m", "vlmcredit.cli.main"]
    plain = subprocess.run(
        [*cmd, "info", "--ckpt", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert plain.returncode == 2
    assert plain.stderr.strip() == f"error: --ckpt {tmp_path / 'x'}: no such folder"
    debug = subprocess.run(
        [*cmd, "--debug", "info", "--ckpt", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "VlmCreditError" in debug.stderr


def test_make_tiny_cli(tmp_path) -> None:
    out = tmp_path / "m"
    result = runner.invoke(app, ["make-tiny", "--family", "qwen2-vl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    again = runner.invoke(app, ["make-tiny", "--family", "qwen2-vl", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.stderr
    bad = runner.invoke(app, ["make-tiny", "--family", "llava", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "qwen2.5-vl" in bad.stderr
    assert not (tmp_path / "n").exists()


def test_no_ckpt_means_the_builtin_model_with_a_note() -> None:
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "qwen2.5-vl" and facts["checkpoint"] == "builtin:tiny-qwen2.5-vl"
    assert (facts["layers"], facts["heads"], facts["kv_heads"]) == (4, 8, 4)
    assert result.stderr.count("\n") == 1 and "built-in demo model" in result.stderr
    named = runner.invoke(app, ["info", "--ckpt", "builtin:tiny-qwen2.5-vl-early", "--json"])
    assert named.exit_code == 0 and "built-in demo model" not in named.stderr
    wrong = runner.invoke(app, ["info", "--ckpt", "builtin:tiny-llama"])
    assert wrong.exit_code != 0
    assert "no such built-in model; built-in: builtin:tiny-qwen2.5-vl" in wrong.output
