"""`vlmcredit weights` end to end on a tiny checkpoint: the registry drives the command, the
online face and the report; `--method anchors` writes exactly the signals `anchors` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit import online
from vlmcredit.cli.main import app
from vlmcredit.formats.signals import read_signals
from vlmcredit.methods import registry
from vlmcredit.methods.registry import Method, MethodOutput, Needs
from vlmcredit.pipelines.skeleton import CRASH_ENV

runner = CliRunner()
FAMILY = "qwen2.5-vl"
RESPONSES = [
    "A red square on the left and a blue circle on the right.",
    "Static noise everywhere, in many colours.",
    "Yes.",
    "Small coloured dots cover the whole picture, like an old television.",
    "No, nothing else.",
]


@dataclass
class UniformConfig:
    value: float = 0.5


def _uniform(passes, cfg):
    out = []
    for p in passes:
        n = len(p.token_ids)
        position = np.arange(n, dtype=np.float32) / max(n, 1)
        out.append(
            MethodOutput(
                weight=np.full(n, cfg.value, dtype=np.float32), columns={"position": position}
            )
        )
    return out


@pytest.fixture(scope="module")
def uniform():
    """A toy method registered from outside the package: no other module is touched."""
    method = registry.register(
        Method(
            name="uniform",
            summary="every response token gets the same weight (a test method)",
            paper="none",
            config=UniformConfig,
            needs=lambda _cfg: Needs(),
            compute=_uniform,
            loss_denominator="selected_tokens",
            columns={"position": "float32"},
        )
    )
    yield method
    registry.REGISTRY.pop("uniform", None)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights-rollouts")
    noise_image(112, 140, 3).save(folder / "a.png")
    noise_image(84, 168, 4).save(folder / "b.png")
    rows = [
        {
            "id": f"s{i}",
            "images": ["a.png"] if i % 2 else ["b.png"],
            "prompt": "Describe the image.",
            "response": text,
        }
        for i, text in enumerate(RESPONSES)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args: str):
    result = runner.invoke(app, [*args, "--quiet"])
    return result


def test_weights_anchors_equals_the_anchors_command(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    common = ["--ckpt", ckpt, "--data", str(rollouts), "--batch-size", "2"]
    a = _run("anchors", *common, "--out", str(tmp_path / "anchors"), "--ratio", "0.2")
    assert a.exit_code == 0, a.output
    w = _run(
        "weights", "--method", "anchors", *common, "--out", str(tmp_path / "w"), "-p", "ratio=0.2"
    )
    assert w.exit_code == 0, w.output
    assert "anchors: 5 responses" in w.output
    assert (tmp_path / "w" / "signals.parquet").read_bytes() == (
        tmp_path / "anchors" / "signals.parquet"
    ).read_bytes()
    sig_a = json.loads((tmp_path / "anchors" / "manifest.json").read_text())["signals"]
    sig_w = json.loads((tmp_path / "w" / "manifest.json").read_text())["signals"]
    for key in ("method", "parameters", "loss_denominator", "selection_scope", "checkpoint"):
        assert sig_a[key] == sig_w[key], key


def test_toy_method_reaches_command_online_and_report(
    uniform, tiny_ckpt, loaded, rollouts, tmp_path
) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    listing = _run("weights", "--list")
    assert "uniform: every response token gets the same weight" in listing.output
    out = tmp_path / "run"
    result = _run(
        "weights", "--method", "uniform", "--ckpt", ckpt, "--data", str(rollouts),
        "--out", str(out), "-p", "value=0.25",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    signals = read_signals(out)
    assert signals.meta["method"] == "uniform"
    assert signals.loss_denominator == "selected_tokens"
    assert signals.meta["extra_columns"] == {"position": "float32"}
    assert len(signals.frame) == len(RESPONSES)
    for row in signals.frame.itertuples():
        np.testing.assert_array_equal(row.weight, np.full(len(row.token_ids), 0.25))
        assert row.position[0] == 0.0 and len(row.position) == len(row.token_ids)

    # online: the same registry entry weights a trainer batch
    ck = loaded(FAMILY)
    batch_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    batch = {
        "input_ids": batch_ids,
        "attention_mask": torch.ones_like(batch_ids),
        "response_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    w = online.weights(ck.model, batch, method="uniform", value=0.75)
    assert "uniform" in online.methods()
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.75], [0.75, 0.75, 1.0]]))

    # export keeps the declared column, and the report shows the run's method
    exported = runner.invoke(
        app, ["export", str(out), "--format", "parquet", "--out", str(tmp_path / "exp")]
    )
    assert exported.exit_code == 0, exported.output
    assert read_signals(tmp_path / "exp").frame.columns.tolist()[-1] == "position"
    page = tmp_path / "report.html"
    shown = _run("report", str(out), "--out", str(page))
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    assert "uniform" in html and "every response token gets the same weight" in html


def test_several_methods_share_one_run(uniform, tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    out = tmp_path / "both"
    result = _run(
        "weights", "--method", "anchors,uniform", "--ckpt", ckpt, "--data", str(rollouts),
        "--out", str(out), "-p", "uniform.value=2", "-p", "anchors.ratio=0.3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    anchors = read_signals(out / "anchors")
    assert anchors.meta["parameters"]["ratio"] == 0.3
    assert {float(w) for row in read_signals(out / "uniform").frame["weight"] for w in row} == {2.0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"] == ["attention"]
    bad = _run(
        "weights", "--method", "anchors,uniform", "--ckpt", ckpt, "--data", str(rollouts),
        "--out", str(tmp_path / "bad"), "-p", "ratio=0.3",
    )  # fmt: skip
    assert bad.exit_code == 2 and "prefix the parameter with the method name" in bad.output
    assert not (tmp_path / "bad").exists()


def test_resume_after_kill_gives_the_same_signals(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    args = ["--ckpt", ckpt, "--data", str(rollouts), "--batch-size", "2", "--quiet"]
    cmd = [sys.executable, "-m", "vlmcredit.cli.main", "weights", *args]
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    crash = subprocess.run(
        [*cmd, "--out", str(killed)], capture_output=True, env={**os.environ, CRASH_ENV: "1"}
    )
    assert crash.returncode == 137
    assert not (killed / "signals.parquet").exists()
    resumed = subprocess.run([*cmd, "--out", str(killed), "--resume"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (killed / "signals.parquet").read_bytes() == (
        tmp_path / "whole" / "signals.parquet"
    ).read_bytes()


def test_bad_input_is_one_line_and_writes_nothing(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    cases = [
        (["--method", "nope"], "unknown; choose one of"),
        (["--method", "anchors", "-p", "ratio=2"], "ratio"),
        (["--method", "anchors", "-p", "depth=3"], "has no parameter 'depth'"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        result = _run("weights", *extra, "--ckpt", ckpt, "--data", str(rollouts), "--out", str(out))
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    missing = _run("weights", "--method", "anchors")
    assert missing.exit_code == 2 and "pass --data, --out" in missing.output
