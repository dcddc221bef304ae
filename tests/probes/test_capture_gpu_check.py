"""benchmarks/gpu.sh (the one-shot GPU check) is known to run: its CPU-runnable parts at a tiny
size, and its fail-fast message where no CUDA device exists."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_tiny_cpu_run_prints_both_tables() -> None:
    proc = _run(
        "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--seq", "192",
        "--questions", "4", "--batch-size", "2", "--rounds", "1", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "## capture vs SDPA vs eager" in out and "## probe-heads questions/s" in out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    capture = [row for row in cells if len(row) == 7 and row[0].isdigit()]
    assert {"sdpa", "capture-mean", "capture-heads", "capture-heads-bf16", "eager"} <= {
        row[3] for row in capture
    }
    assert all(float(row[5].split("/")[1]) > 0 for row in capture)  # median ratio measured
    logits = next(row for row in cells if row[0].startswith("logits"))
    assert float(logits[1]) > 0  # questions per second were measured
    assert "skipped" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_fails_fast_with_a_clear_message() -> None:
    proc = _run()  # the real check: 7B shape on cuda
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--preset tiny --device cpu" in proc.stderr
    assert proc.stdout == ""  # nothing was built
