"""`vlmcredit capture --store-dtype`: bf16/fp16 runs hold the fp32 capture rounded once, the
manifest says which, and a resume with another store dtype is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.formats.run import Run

runner = CliRunner()


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rollouts")
    noise_image(120, 160, 1).save(folder / "a.png")
    rows = [
        {"id": f"s{i}", "images": ["a.png"], "prompt": "Describe.", "response": "Noise." * (i + 1)}
        for i in range(3)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _capture(ckpt: str, data: Path, out: Path, *extra: str):
    args = ["capture", "--ckpt", ckpt, "--data", str(data), "--out", str(out), "--quiet"]
    return runner.invoke(app, [*args, "--reduce", "heads", "--no-qk", *extra])


def test_store_dtype_rounds_the_fp32_capture_once(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt("qwen2.5-vl"))
    assert _capture(ckpt, rollouts, tmp_path / "fp32").exit_code == 0
    reference = Run.load(tmp_path / "fp32")
    assert reference.manifest["capture"]["attention_dtype"] == "float32"
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / name
        result = _capture(ckpt, rollouts, out, "--store-dtype", name)
        assert result.exit_code == 0, result.output
        run = Run.load(out)
        assert run.manifest["capture"]["attention_dtype"] == str(dtype).removeprefix("torch.")
        for row in run.rows:
            got = run.tensors(row["id"])["attention"]
            want = reference.tensors(row["id"])["attention"]
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want.to(dtype))  # the same numbers, rounded once


def test_resume_with_another_store_dtype_is_refused(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt("qwen2.5-vl"))
    out = tmp_path / "run"
    assert (
        _capture(ckpt, rollouts, out, "--store-dtype", "bf16", "--max-samples", "1").exit_code == 0
    )
    changed = _capture(
        ckpt, rollouts, out, "--store-dtype", "fp32", "--resume", "--max-samples", "1"
    )
    assert changed.exit_code == 2 and "store_dtype" in changed.stderr
    bad = _capture(ckpt, rollouts, tmp_path / "bad", "--store-dtype", "int8")
    assert bad.exit_code == 2
    assert "--store-dtype int8: choose one of fp32, bf16, fp16" in bad.stderr
