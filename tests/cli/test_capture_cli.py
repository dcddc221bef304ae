"""`vlmcredit capture` end to end on a tiny checkpoint: run folder, resume after a kill, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.skeleton import CRASH_ENV

runner = CliRunner()


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rollouts")
    noise_image(120, 160, 1).save(folder / "a.png")
    noise_image(200, 100, 2).save(folder / "b.png")
    rows = [
        {
            "id": f"s{i}",
            "images": ["a.png"] if i % 2 else ["a.png", "b.png"],
            "prompt": "Describe the image.",
            "response": f"A picture with noise, number {i}." + " More words." * (i % 3),
        }
        for i in range(7)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmcredit.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _capture(ckpt: str, data: Path, out: Path, *extra: str):
    """Invoke `vlmcredit capture` in-process with the common options."""
    args = ["capture", "--ckpt", ckpt, "--data", str(data), "--out", str(out), "--quiet"]
    return runner.invoke(app, [*args, *extra])


def _all_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    run = Run.load(run_dir)
    out = {}
    for row in run.rows:
        if row["status"] == "done":
            for name, t in run.tensors(row["id"]).items():
                out[f"{row['id']}/{name}"] = t
    return out


def test_capture_writes_run_folder(tiny_ckpt, rollouts, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["capture", "--ckpt", str(tiny_ckpt("qwen2.5-vl")), "--data", str(rollouts)]
    result = runner.invoke(app, [*args, "--out", str(out), "--batch-size", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["samples_done"] == 7
    assert manifest["checkpoint"]["family"] == "qwen2.5-vl"
    assert len(manifest["checkpoint"]["weights_sha1"]) == 40
    table = pd.read_parquet(out / "samples.parquet")
    assert list(table["id"]) == [f"s{i}" for i in range(7)]
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    tensors = Run.load(out).tensors("s0")
    n_resp = int(table.loc[0, "num_response_tokens"])
    n_img = int(table.loc[0, "num_image_tokens"])
    assert tensors["attention"].shape == (3, 1, n_resp, n_img)  # default --reduce mean
    assert tensors["queries.2"].shape == (4, n_resp, 16)
    assert tensors["keys.2"].shape == (4, n_img, 16)
    assert tensors["image_boxes"].shape == (n_img, 4)
    # Rerunning into the same folder without --resume is refused and changes nothing.
    again = runner.invoke(app, [*args, "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.stderr


def test_resume_after_kill_equals_uninterrupted(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt("qwen3-vl"))
    common = [
        "capture",
        "--ckpt",
        ckpt,
        "--data",
        str(rollouts),
        "--batch-size",
        "2",
        "--quiet",
        "--reduce",
        "heads",
    ]
    full = tmp_path / "full"
    assert _cli(*common, "--out", str(full)).returncode == 0
    killed = tmp_path / "killed"
    crash = _cli(*common, "--out", str(killed), env={CRASH_ENV: "2"})
    assert crash.returncode == 137
    partial = Run.load(killed)
    assert partial.manifest["status"] == "running"
    assert len(partial.rows) == 4  # two batches of two were committed before the kill
    resumed = _cli(*common, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _all_tensors(full), _all_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert Run.load(killed).manifest["status"] == "finished"
    # Resuming with different parameters is refused.
    changed = _cli(*common[:-1], "mean", "--out", str(killed), "--resume")
    assert changed.returncode == 2 and "different parameters (reduce)" in changed.stderr


def test_skip_bad_rows_are_recorded(tiny_ckpt, rollouts, tmp_path) -> None:
    data = tmp_path / "mixed.jsonl"
    lines = rollouts.read_text().splitlines()[:2]
    lines.insert(
        1, json.dumps({"id": "broken", "images": ["missing.png"], "prompt": "x", "response": "y"})
    )
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "a.png").write_bytes((rollouts.parent / "a.png").read_bytes())
    (tmp_path / "b.png").write_bytes((rollouts.parent / "b.png").read_bytes())
    args = ["capture", "--ckpt", str(tiny_ckpt("qwen2-vl")), "--data", str(data), "--quiet"]
    strict = runner.invoke(app, [*args, "--out", str(tmp_path / "strict")])
    assert strict.exit_code == 2 and "row 1" in strict.stderr and "--skip-bad" in strict.stderr
    assert not (tmp_path / "strict").exists()
    lenient = runner.invoke(app, [*args, "--out", str(tmp_path / "lenient"), "--skip-bad"])
    assert lenient.exit_code == 0, lenient.output
    table = pd.read_parquet(tmp_path / "lenient" / "samples.parquet")
    bad = table[table["status"] == "bad"]
    assert list(bad["row"]) == [1] and "missing.png" in bad["error"].iloc[0]
    assert (table["status"] == "done").sum() == 2


def test_generate_mode_and_option_errors(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = str(tiny_ckpt("qwen2.5-vl"))
    out = tmp_path / "gen"
    result = _capture(
        ckpt,
        rollouts,
        out,
        "--generate",
        "2",
        "--max-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--no-qk",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "samples.parquet")
    assert list(table["id"]) == ["s0#g0", "s0#g1", "s1#g0", "s1#g1"]
    first = load_file(str(out / table.loc[0, "shard"]))
    ids = first["s0#g0/response_ids"]
    assert 1 <= ids.numel() <= 5
    assert first["s0#g0/attention"].shape[2] == ids.numel()
    assert not any(k.startswith("s0#g0/queries") for k in first)
    for bad_args, fragment in [
        (["--reduce", "max"], "--reduce max"),
        (["--layers", "9"], "--layers '9'"),
        (["--heads", "2-1"], "--heads '2-1'"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--top-p", "1.5", "--generate", "1"], "--top-p 1.5"),
    ]:
        r = _capture(ckpt, rollouts, tmp_path / "x", *bad_args)
        assert r.exit_code == 2, bad_args
        assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    missing = runner.invoke(
        app,
        [
            "capture",
            "--ckpt",
            ckpt,
            "--data",
            str(tmp_path / "no.jsonl"),
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert missing.exit_code == 2 and "no.jsonl" in missing.stderr
